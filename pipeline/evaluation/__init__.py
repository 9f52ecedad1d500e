"""Test-split evaluation: predictions, metrics with bootstrap intervals, calibration, plots and the report.

Metric names: ``test/<metric>`` for the plain predictions, ``test_tta/<metric>`` with test-time
augmentation, ``test_calibrated/<metric>`` (ece, brier, nll) after temperature scaling, each scalar
with ``<metric>_ci_low`` / ``<metric>_ci_high`` beside it; ``<split>/<metric>/<class>`` per class;
``calibration/*`` for the fitted temperature and the validation NLL before and after it.

Modules: ``predictions`` (model outputs), ``metrics`` (point estimates and the bootstrap), ``scoring``
(one split's metrics with intervals, the positive class), ``calibration`` (temperature scaling, reliability
bins), ``decision`` (threshold, conformal sets), ``plots`` (PNGs and DVC plot data), ``reporting`` (the
Markdown report), ``audit`` (the label audit), ``explain`` (Grad-CAM maps and
the report's panel), ``evaluate`` (:func:`~pipeline.evaluation.evaluate.evaluate`,
all of them on the test split) and ``assess`` (the evaluate stage's work).
"""

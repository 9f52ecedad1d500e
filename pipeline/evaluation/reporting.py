"""The Markdown report a person reads first: warnings, metrics with intervals, calibration, data, settings, plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline import vocabulary
from pipeline.config import FROZEN_MODES, Evaluate
from pipeline.data.size import small_for_pretrained
from pipeline.evaluation import decision
from pipeline.evaluation.calibration import TEMPERATURE_BOUNDS
from pipeline.evaluation.metrics import BINARY, CALIBRATION, HEADLINE, PER_CLASS
from pipeline.evaluation.scoring import positive_index
from pipeline.runinfo import MODEL_SHA_TAG, RunInfo  # imports no torch

# The metrics file DVC shows by default (`dvc metrics show`, `dvc exp show`): what runs are compared on. Every
# other number (intervals, per class, calibration details) is in paths.metrics_detail, and all are in MLflow.
# A binary task's tuned cut (evaluate.threshold) is what predict applies: its numbers stand beside those at 0.5,
# named test_threshold/* after decision/threshold (absent when the cut is 0.5: test/* are then the ones served).
HEADLINE_KEYS = (
    *(f"{split}/{m}" for split in ("test", "test_tta") for m in (*HEADLINE, *BINARY)),
    "decision/threshold",
    *(f"test_threshold/{m}" for m in ("accuracy", "balanced_accuracy", *BINARY)),
    "operating/misses",
    "operating/false_alarms",
    "test/ece",
    "test_calibrated/ece",
    "cv/accuracy",
    "cv/auroc",
    "weights/pretrained",
)
SPLITS = {"test": "plain", "test_tta": "with TTA", "test_calibrated": "temperature-scaled"}
KEY_HPARAMS = ("lr", "weight_decay", "optimizer", "dropout", "label_smoothing", "monitor")
SMALL_TEST_CLASS = 10  # fewer test images of a class than this: a warning


def split_headline(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics as (headline, the rest): the ``HEADLINE_KEYS`` present, in that order, and all others."""
    return {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}, {
        k: v for k, v in metrics.items() if k not in HEADLINE_KEYS
    }


def _value(metrics: Mapping[str, Any], key: str) -> str:
    return f"{metrics[key]:.4f}" if key in metrics else "—"


def _interval(metrics: Mapping[str, Any], key: str) -> str:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    return "—" if low is None or high is None else f"{low:.3f} – {high:.3f}"


def metric_table(
    metrics: Mapping[str, Any],
    names: Sequence[str],
    splits: Sequence[str],
    shown: Mapping[str, str] | None = None,
) -> str:
    """Rows: the ``names`` any split has (as ``shown`` names them); per split a value column and a 95% CI column."""
    rows = [n for n in names if any(f"{s}/{n}" in metrics for s in splits)]
    header = ["metric"] + [h for s in splits for h in (SPLITS.get(s, s), "95% CI")]
    body = [
        [(shown or {}).get(n, n)]
        + [cell for s in splits for cell in (_value(metrics, f"{s}/{n}"), _interval(metrics, f"{s}/{n}"))]
        for n in rows
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *body])


def binary_names(classes: Sequence[str], settings: Evaluate) -> dict[str, str]:
    """'sensitivity for pneumonia', 'specificity (recall of normal)': the binary metrics named by their classes."""
    positive = positive_index(classes, settings.positive_class)
    if positive is None:
        return {}
    negative = classes[1 - positive]
    return {
        "sensitivity": f"sensitivity for {classes[positive]}",
        "specificity": f"specificity (recall of {negative})",
    }


def _calibration_effect(metrics: Mapping[str, Any]) -> tuple[str, bool]:
    """Temperature scaling's effect on the test split, in words, and whether it made test calibration worse."""
    changes = [
        (name, metrics[f"test/{name}"], metrics[f"test_calibrated/{name}"])
        for name in CALIBRATION
        if f"test/{name}" in metrics and f"test_calibrated/{name}" in metrics
    ]
    text = ", ".join(
        f"{name.upper() if name != 'brier' else 'Brier'} {a:.3f} → {b:.3f}" for name, a, b in changes
    )
    worse = any(name in ("ece", "nll") and b > a for name, a, b in changes)
    return text, worse


def _wide_intervals(metrics: Mapping[str, Any], limit: float) -> list[str]:
    wide = []
    for name in (*HEADLINE, *BINARY):
        low, high = metrics.get(f"test/{name}_ci_low"), metrics.get(f"test/{name}_ci_high")
        if low is not None and high is not None and high - low > limit:
            wide.append(f"{name} {low:.2f} – {high:.2f}")
    return wide


def warnings(
    metrics: Mapping[str, Any], data_report: Mapping[str, Any], run: RunInfo, settings: Evaluate
) -> list[str]:
    """What a reader must know before trusting the numbers, most serious first."""
    out = []
    if not run.weights.pretrained:
        reason = run.weights.fallback_reason or "model.weights is 'none'"
        out.append(f"**Random initialization, not pretrained weights** — {reason}.")
    small_input = small_for_pretrained(
        run.preprocessing.image_size, run.weights.requested, run.weights.pretrained
    )
    if small_input:
        out.append(f"**Small images for pretrained weights** — {small_input}.")
    leaks = data_report.get("leakage") or []
    if leaks:
        out.append(
            f"**Leakage** — {len(leaks)} set(s) of duplicate images or groups span more than one split "
            f"(data.on_leakage: warn), e.g. {', '.join(leaks[0])}: test metrics are likely optimistic."
        )
    wide = _wide_intervals(metrics, settings.ci_warn_width)
    if wide:
        n = sum(data_report["counts"]["test"].values())
        out.append(
            f"**Wide intervals** — the test set ({n} images) is too small to pin these down (95% CI wider "
            f"than evaluate.ci_warn_width {settings.ci_warn_width}): {'; '.join(wide)}. Differences between "
            "runs smaller than these intervals are noise; more test images would narrow them."
        )
    small = [f"{c} ({n})" for c, n in data_report["counts"]["test"].items() if n < SMALL_TEST_CLASS]
    if small:
        out.append(
            f"Fewer than {SMALL_TEST_CLASS} test images for: {', '.join(small)} — their metrics are very noisy."
        )
    if data_report.get("rejected"):
        out.append(f"{len(data_report['rejected'])} unreadable image file(s) were skipped at ingest.")
    temperature = metrics.get("calibration/temperature")
    if metrics.get("calibration/val_accuracy") == 1:
        out.append(
            "Every validation image is classified right, so temperature scaling has nothing to fit "
            "(the validation NLL keeps falling as T -> 0): T is left at 1."
        )
    elif temperature is not None and temperature in TEMPERATURE_BOUNDS:
        out.append(
            f"The fitted temperature hit its bound ({temperature:g}): the validation split is too small or too "
            "easy to calibrate on; treat test_calibrated/* with care."
        )
    effect, worse = _calibration_effect(metrics)
    if worse and temperature is not None:
        out.append(
            f"**Temperature scaling made test calibration worse** ({effect}; T = {temperature:.3f} fitted on "
            "the validation split): do not use the temperature-scaled confidences. The probabilities that "
            'predict, export and the registered model return are the uncalibrated ones (the "plain" '
            "column)."
        )
    coverage = decision.coverage_warning(
        metrics.get("conformal/alpha"),
        metrics.get("conformal/coverage"),
        metrics.get("conformal/coverage_ci_low"),
        metrics.get("conformal/coverage_ci_high"),
        "out-of-fold" if "cv/accuracy" in metrics else "validation",
    )
    if coverage:
        out.append(f"**Conformal sets miss their level** — the {coverage}.")
    out += [f"Ingest: {w}" for w in data_report.get("warnings", [])]
    return out


def _data_section(data_report: Mapping[str, Any]) -> list[str]:
    counts = pd.DataFrame(data_report["counts"]).rename_axis("class")
    counts["total"] = counts.sum(axis=1)
    dup = data_report.get("duplicates", {})
    how = data_report.get("split_by", "?") + (
        f", {data_report['folds']} folds" if data_report.get("folds") else ""
    )
    leaks = len(data_report.get("leakage") or [])
    if data_report.get("groups"):
        groups = f"{data_report['groups']} patient (group) IDs, each kept within one split"
    elif data_report.get("split_by") == "manifest":
        groups = "patient-level separation of the manifest's split was **not checked** (no group column)"
    else:
        groups = (
            "patient-level separation was **not checked**: no group column (or DICOM PatientID) was given, so "
            "two images of one patient may sit in train and test"
        )
    return [
        "## Data",
        "",
        f"`{data_report['source']}`: {data_report['n_images']} images, {len(data_report['classes'])} classes, "
        f"{_sizes(data_report)}; split {how}.",
        "",
        counts.to_markdown(),
        "",
        f"Duplicates: {dup.get('n_exact_sets', 0)} set(s) of identical files and "
        f"{dup.get('n_near_sets', dup.get('n_near_pairs', 0))} set(s) of near duplicates, each kept within one "
        f"split; leakage of duplicates across splits: {leaks or 'none found'}; {groups}. Unreadable files skipped: "
        f"{len(data_report.get('rejected') or [])}.",
        "",
    ]


def _sizes(data_report: Mapping[str, Any]) -> str:
    """'resized to 64 px from native 28x28 (upscaled)': the cache size with the files' own sizes."""
    side = data_report["image_size"]
    native = (data_report.get("formats") or {}).get("size") or {}
    why = f" ({data_report['image_size_reason']})" if data_report.get("image_size_reason") else ""
    if not native:
        return f"resized to {side} px{why}"
    shown = ", ".join(f"{size} ({n})" for size, n in list(native.items())[:3]) + (
        ", ..." if len(native) > 3 else ""
    )
    small = sum(n for size, n in native.items() if min(map(int, size.split("x"))) < side)
    how = f"**{small} of them upscaled**: pixels added, no detail" if small else "none upscaled"
    return f"resized to {side} px{why} from native sizes {shown} ({how})"


def _provenance_section(
    data_report: Mapping[str, Any], provenance: Mapping[str, str], sha256: str
) -> list[str]:
    """Which data, model and code produced these numbers, where their MLflow record is, and which files were
    left out (``data.exclude``)."""
    excluded = data_report.get("excluded") or {}
    left_out = (
        f"{excluded.get('n', 0)} file(s) listed in `{excluded['file']}` (data.exclude)"
        + (
            ": " + ", ".join(f"`{Path(p).name}`" for p in excluded.get("paths", [])[:10])
            if excluded.get("n")
            else ""
        )
        + (", ..." if excluded.get("n", 0) > 10 else "")
        if excluded.get("file")
        else "none (data.exclude is null)"
    )
    dirty = provenance.get("code.dirty") == "true"
    rows = {
        "data set": f"`{provenance.get('data.dataset', Path(str(data_report['source'])).name)}`",
        "data version (DVC hash)": f"`{provenance.get('data.version', 'unknown')}`",
        "model (sha256 of its checkpoints)": f"`{sha256 or 'unrecorded'}`",
        "code (git commit)": f"`{provenance.get('code.commit', 'unknown')}`"
        + (" with uncommitted changes" if dirty else "")
        + (
            f" (the last commit that changed {provenance['code.paths']})"
            if "code.paths" in provenance
            else ""
        ),
        # No date, no run id: this file is a DVC output, the same bytes for the same inputs (dvc.lock too).
        "evaluation record": f"its date and MLflow run are in MLflow: the evaluate run tagged "
        f"`{MODEL_SHA_TAG}` = `{sha256 or 'unrecorded'}`, nested under the train run with that tag",
        "files excluded": left_out,
    }
    return [
        "## Provenance",
        "",
        "| | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows.items()],
        "",
    ]


def _mixing(hparams: Mapping[str, Any]) -> str:
    """augment.mixup_alpha / cutmix_alpha / mix_prob / cutmix_switch_prob as the checkpoint recorded them."""
    mixup, cutmix = hparams.get("mixup_alpha", 0.0), hparams.get("cutmix_alpha", 0.0)
    parts = [f"{name} alpha {alpha:g}" for name, alpha in (("MixUp", mixup), ("CutMix", cutmix)) if alpha]
    if not parts:
        return "off"
    share = hparams.get("mix_prob", 1.0)
    how = ["every batch mixed" if share >= 1 else f"{share:.0%} of the batches mixed"]
    if mixup and cutmix:
        how.append(f"CutMix in {hparams.get('cutmix_switch_prob', 0.5):.0%} of those")
    return ", ".join(parts) + f" ({', '.join(how)})"


def _settings_section(
    classes: Sequence[str],
    run: RunInfo,
    settings: Evaluate,
    hparams: Mapping[str, Any],
    tta: Sequence[str],
) -> list[str]:
    rows = {
        "model": f"`{run.arch}`",
        "weights": f"`{run.weights.source}`",
        "training mode": f"`{run.mode}`",
    }
    rows |= {f"train {k}": f"`{hparams[k]}`" for k in KEY_HPARAMS if k in hparams}
    # The frozen-feature modes (train.mode linear_probe | knn) fit a head without the training step's mixing.
    rows["batch mixing"] = (
        _mixing(hparams) if run.mode not in FROZEN_MODES else f"off (train.mode {run.mode})"
    )
    rows["weight averaging"] = f"EMA, decay {run.ema_decay:g}" if run.ema_decay else "off"
    rows[f"{run.checkpoint} checkpoint"] = f"{run.monitor} {run.best_score:.4f} after {run.epochs_run} epochs"
    rows |= {
        "test-time augmentation": ", ".join(tta) or "off",
        "bootstrap": f"{settings.bootstrap} resamples, 95% percentile intervals"
        if settings.bootstrap
        else "off",
        "calibration": f"ECE over {settings.ece_bins} equal-width confidence bins; temperature scaling "
        + ("on" if settings.temperature_scaling else "off"),
    }
    names = binary_names(classes, settings)
    if names:
        how = (
            "evaluate.positive_class"
            if settings.positive_class
            else f"evaluate.positive_class is null: {vocabulary.default_positive(classes)[1]}"
        )
        rows["positive class"] = f"`{names['sensitivity'].removeprefix('sensitivity for ')}` ({how})"
    return [
        "## Settings",
        "",
        "| setting | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in rows.items()],
        "",
    ]


def cv_section(metrics: Mapping[str, Any], k: int) -> list[str]:
    """Out-of-fold scores beside the test scores, when the model is a fold ensemble."""
    names = [m for m in (*HEADLINE, *BINARY) if f"cv/{m}" in metrics]
    if not names:
        return []
    rows = [
        f"| {m} | {metrics[f'cv/{m}']:.3f} | {metrics.get(f'cv/{m}_fold_mean', float('nan')):.3f} "
        f"± {metrics.get(f'cv/{m}_fold_std', float('nan')):.3f} | "
        + (f"{metrics[f'test/{m}']:.3f}" if f"test/{m}" in metrics else "–")
        + " |"
        for m in names
    ]
    return [
        "## Cross-validation",
        "",
        f"{k}-fold cross-validation over train+val (grouped, stratified folds): each fold model was "
        "selected on its own fold, and every train+val image has one out-of-fold (OOF) prediction "
        "(`models/oof.csv`). Test is the ensemble's, on images no member saw.",
        "",
        "| metric | OOF, all folds | per fold, mean ± sd | test (ensemble) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ]


def report(
    metrics: Mapping[str, Any],
    data_report: Mapping[str, Any],
    run: RunInfo,
    plot_files: Sequence[str],
    tta: Sequence[str] = (),
    *,
    settings: Evaluate | None = None,
    hparams: Mapping[str, Any] | None = None,
    extra: Sequence[tuple[str, str]] = (),
    provenance: Mapping[str, str] | None = None,
) -> str:
    """The Markdown report.

    ``plot_files``: images to embed (paths relative to the report); ``tta``: names of the test-time
    transforms, if any; ``hparams``: the checkpoint's hyperparameters; ``extra``: (heading, Markdown)
    sections appended at the end, e.g. a Grad-CAM panel; ``provenance``: the lineage tags
    (``tracking.lineage_tags``) and ``date``.
    """
    settings = settings or Evaluate()
    splits = ["test", "test_tta"] if tta else ["test"]
    classes = data_report["classes"]
    per_class = pd.DataFrame(
        {m: {c: metrics.get(f"test/{m}/{c}") for c in classes} for m in (*PER_CLASS, "support")}
    ).rename_axis("class")
    notes = [
        f"TTA averages the predictions over the image and {', '.join(tta)}."
        if tta
        else "No test-time augmentation (evaluate.tta is empty)."
    ]
    cut = metrics.get("decision/threshold")
    if cut is not None and cut != 0.5:
        notes.append(
            f"**The thresholded numbers above (accuracy, sensitivity, specificity, ...) are at 0.5; predict "
            f"applies the cut {cut:.4f}** (evaluate.threshold): its numbers are under *Decision threshold* "
            "below and in reports/metrics.json as `test_threshold/*`."
        )
    if metrics.get("test/bootstrap_skipped"):
        notes.append(
            f"{metrics['test/bootstrap_skipped']} of {settings.bootstrap} bootstrap resamples lacked a "
            "class; the class-dependent intervals (balanced accuracy, macro-F1, AUROC, sensitivity, "
            "specificity) use the others."
        )
    calibration = [
        "Probabilities returned by predict, export and the registered MLflow model: the plain softmax "
        '(no test-time augmentation, no temperature), the "plain" column.',
        "",
    ]
    if "calibration/temperature" in metrics:
        effect, worse = _calibration_effect(metrics)
        fitted_on = "the out-of-fold predictions" if "cv/accuracy" in metrics else "the validation split"
        calibration = [
            f"Temperature T = {metrics['calibration/temperature']:.3f}, fitted on {fitted_on} "
            f"(NLL {metrics['calibration/val_nll']:.4f} → {metrics['calibration/val_nll_calibrated']:.4f}); "
            "it changes confidences, not predicted classes. "
            f"On the test split: {effect} — "
            + (
                "**worse**: the validation split did not carry over to the test split."
                if worse
                else "better or unchanged."
            )
            + " The temperature is not applied to the served model.",
            "",
            *calibration,
        ]
    lines = [
        f"# Evaluation report — {data_report['source']}",
        "",
        # No run id here: the report stays the same between identical runs (a clean git tree after `make demo`).
        f"Model `{run.arch}`, weights: `{run.weights.source}`; "
        + (
            f"an ensemble of {len(run.checkpoints)} fold models (mean probabilities)"
            if len(run.checkpoints) > 1
            else f"the weights of its {run.checkpoint} training epoch (train.checkpoint: {run.checkpoint}), "
            f"in the file `{run.checkpoints[0]}` whichever epoch is kept"
        )
        + f". Its MLflow train run carries the tag `{MODEL_SHA_TAG}` (see Provenance); this report is logged to an "
        "evaluate run nested under it.",
        "",
        "## Warnings",
        "",
        *([f"- {w}" for w in warnings(metrics, data_report, run, settings)] or ["- none"]),
        "",
        *cv_section(metrics, len(run.checkpoints)),
        "## Test metrics",
        "",
        metric_table(metrics, (*HEADLINE, *BINARY), splits, binary_names(classes, settings)),
        "",
        *notes,
        "",
        "## Calibration",
        "",
        metric_table(
            metrics, CALIBRATION, [s for s in (*splits, "test_calibrated") if f"{s}/ece" in metrics]
        ),
        "",
        "ECE: expected calibration error; Brier: mean over images of the summed squared error of the class "
        "probabilities; NLL: mean negative log-likelihood. Lower is better for all three.",
        "",
        *calibration,
        "## Per class",
        "",
        "Plain predictions (no TTA).",
        "",
        per_class.to_markdown(floatfmt=("", ".3f", ".3f", ".3f", ".3f", ".0f"), missingval="—"),
        "",  # support: a count
        *_data_section(data_report),
        *_provenance_section(data_report, provenance or {}, run.model_sha256),
        *_settings_section(classes, run, settings, hparams or {}, tta),
        "## Plots",
        "",
        *[line for f in plot_files for line in (f"![{Path(f).stem}]({f})", "")],
    ]
    for heading, body in extra:
        lines += [f"## {heading}", "", body, ""]
    return "\n".join(lines)

"""Decisions fitted on a selection set and applied unchanged to test and to predict: the binary decision
threshold (``evaluate.threshold``) and split-conformal prediction sets (``evaluate.conformal_alpha``).

The selection set is a set of held-out predictions with labels: today the validation split's (the lead's
cross-validation passes out-of-fold ones); never the test split, whose labels only score the result.
Both are written here rather than taken from a library: a threshold for an objective is a scan over the
sorted scores, and split conformal with the LAC score (Sadinle et al., 2019) is one quantile. MAPIE and
crepes wrap a fitted scikit-learn estimator; ours are probability arrays, so their wrappers add nothing.
tests/test_decision.py checks the threshold against the objectives and the coverage against theory.

``Decision`` is the contract evaluate writes (``paths.decision``) and predict reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Evaluate, parse_threshold
from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import resample_weights
from pipeline.evaluation.scoring import split_metrics
from pipeline.fsutil import write_json

THRESHOLD_SPLIT = "test_threshold"  # metrics at the chosen threshold: test_threshold/accuracy, ...
THRESHOLDED = (
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "sensitivity",
    "specificity",
)  # what a cut changes
SET_SEPARATOR = "|"  # predict's 'set' column: class names joined by this
BALANCED = 0.02  # a test prevalence this close to 50% reads as a split balanced by construction


class DecisionError(PipelineError, ValueError):
    """A decision setting that the data cannot support; the message names the key."""


# --- the threshold -----------------------------------------------------------------------------------


def candidate_thresholds(scores: np.ndarray) -> np.ndarray:
    """Cuts between consecutive distinct scores, and one below and one above them all (predict positive at >=)."""
    distinct = np.unique(np.asarray(scores, dtype=float))
    inner = (distinct[1:] + distinct[:-1]) / 2
    above = (distinct[-1] + 1) / 2 if distinct[-1] < 1 else np.nextafter(1.0, 2.0)
    return np.concatenate([[distinct[0] / 2], inner, [above]])


def rates(scores: np.ndarray, positives: np.ndarray, cuts: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sensitivity, specificity and positive-class F1 of calling ``scores >= cut`` positive, per cut."""
    called = np.asarray(scores)[None, :] >= np.asarray(cuts)[:, None]
    positives = np.asarray(positives, dtype=bool)
    tp = (called & positives).sum(1)
    fp = (called & ~positives).sum(1)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(tp > 0, 2 * tp / (tp + fp + n_pos), 0.0)
    return tp / n_pos, 1 - fp / n_neg, f1


def choose_threshold(scores: np.ndarray, positives: np.ndarray, rule: float | str) -> float:
    """The cut on positive-class probabilities ``scores`` for ``rule`` (an ``evaluate.threshold`` value).

    youden / balanced_accuracy maximise sensitivity + specificity (the same cut: balanced accuracy is
    (1 + J) / 2); f1 maximises the positive class's F1; among equally good cuts the one nearest 0.5 wins.
    sensitivity:x takes the highest cut whose sensitivity is >= x (the best specificity that keeps it);
    specificity:x the lowest cut whose specificity is >= x. A fixed number is returned as it is.
    """
    objective, number = parse_threshold(rule)
    if objective == "fixed":
        assert number is not None, rule  # parse_threshold gives a fixed cut its number
        return float(number)
    positives = np.asarray(positives, dtype=bool)
    if positives.all() or not positives.any():
        raise DecisionError(
            f"evaluate.threshold: {rule!r} needs both classes in the selection set; it has "
            f"{int(positives.sum())} positive of {len(positives)} images"
        )
    cuts = candidate_thresholds(scores)
    sensitivity, specificity, f1 = rates(scores, positives, cuts)
    if objective == "sensitivity":
        assert number is not None, rule  # parse_threshold gives a target rate its number
        return float(cuts[sensitivity >= number - 1e-12].max())
    if objective == "specificity":
        assert number is not None, rule
        return float(cuts[specificity >= number - 1e-12].min())
    value = f1 if objective == "f1" else sensitivity + specificity
    best = np.flatnonzero(np.isclose(value, value.max(), rtol=0, atol=1e-12))
    return float(cuts[best[np.argmin(np.abs(cuts[best] - 0.5))]])


def thresholded(probs: np.ndarray, positive: int, threshold: float) -> np.ndarray:
    """Hard decisions as one-hot 'probabilities' (positive when its probability >= ``threshold``), so the
    argmax-based metrics and their bootstrap score the thresholded decisions."""
    called = np.where(probs[:, positive] >= threshold, positive, 1 - positive)
    return np.eye(probs.shape[1])[called]


# --- conformal prediction sets -------------------------------------------------------------------------


def conformal_quantile(probs: np.ndarray, labels: np.ndarray, alpha: float) -> float:
    """Split-conformal LAC quantile: the ceil((n + 1)(1 - alpha))-th smallest score 1 - p(true class).

    A class c is in an image's set when 1 - p_c <= q; for exchangeable images the set then holds the true
    class with probability >= 1 - alpha. With too few images for alpha (n < 1/alpha - 1) q is 1: every
    class is in every set.
    """
    scores = np.sort(1 - probs[np.arange(len(labels)), labels])
    rank = math.ceil((len(scores) + 1) * (1 - alpha))
    return 1.0 if rank > len(scores) else float(scores[rank - 1])


def prediction_sets(probs: np.ndarray, quantile: float) -> np.ndarray:
    """(N, classes) booleans: class c is in image i's set when 1 - p_ic <= ``quantile``."""
    return 1 - np.asarray(probs) <= quantile + 1e-12


def conformal_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    quantile: float,
    alpha: float,
    n_selection: int,
    n_resamples: int,
    seed: int,
) -> dict[str, float]:
    """Empirical coverage and mean set size on ``probs`` (test), with bootstrap 95% intervals."""
    sets = prediction_sets(probs, quantile)
    per_image = {
        "coverage": sets[np.arange(len(labels)), labels].astype(float),
        "mean_set_size": sets.sum(1).astype(float),
        "empty_share": (sets.sum(1) == 0).astype(float),
        "singleton_share": (sets.sum(1) == 1).astype(float),
    }
    out = {
        "conformal/alpha": alpha,
        "conformal/quantile": round(quantile, 6),
        "conformal/n_selection": n_selection,
    }
    out |= {f"conformal/{k}": round(float(v.mean()), 6) for k, v in per_image.items()}
    if n_resamples:
        weights = resample_weights(len(labels), n_resamples, np.random.default_rng(seed))
        for name in ("coverage", "mean_set_size"):
            low, high = np.percentile(weights @ per_image[name] / len(labels), [2.5, 97.5])
            out |= {
                f"conformal/{name}_ci_low": round(float(low), 6),
                f"conformal/{name}_ci_high": round(float(high), 6),
            }
    return out


# --- the decision record and its metrics ------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What evaluate decided on the selection set, for predict: written to ``paths.decision``."""

    model_sha256: str  # the model it was fitted for (run.json's; predict ignores a decision of another model)
    classes: tuple[str, ...]
    selection: str  # which predictions it was fitted on, e.g. 'val'
    positive_class: str | None = None  # binary tasks
    threshold_rule: str | None = None  # evaluate.threshold as given
    threshold: float | None = None  # the cut on the positive-class probability
    conformal_alpha: float | None = None
    conformal_quantile: float | None = None
    # The sets' coverage measured on test, with its 95% bootstrap interval: predict warns when it misses the target.
    test_coverage: float | None = None
    test_coverage_ci_low: float | None = None
    test_coverage_ci_high: float | None = None

    def coverage_warning(self) -> str | None:
        """:func:`coverage_warning` of these sets (None when they are off or were not measured)."""
        return coverage_warning(
            self.conformal_alpha,
            self.test_coverage,
            self.test_coverage_ci_low,
            self.test_coverage_ci_high,
            self.selection,
        )

    def write(self, path: str | Path) -> None:
        write_json(path, asdict(self))

    @classmethod
    def read(cls, path: str | Path) -> Decision:
        try:
            raw = json.loads(Path(path).read_text())
            # From before 2026-12-07, when it named the MLflow run: read as fitted for no known model (ignored).
            if "model_sha256" not in raw and "run_id" in raw:
                raw = {k: v for k, v in raw.items() if k != "run_id"} | {"model_sha256": ""}
            return cls(**raw | {"classes": tuple(raw["classes"])})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise DecisionError(
                f"{path}: not a decision.json this code can read ({type(err).__name__}: {err}); rerun the "
                "evaluate stage (dvc repro evaluate), or restore it (dvc checkout)"
            ) from None

    def predicted(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: the threshold on the positive class for binary tasks, else the most probable class."""
        if self.threshold is None or self.positive_class is None:
            return probs.argmax(1)
        positive = self.classes.index(self.positive_class)
        return np.where(probs[:, positive] >= self.threshold, positive, 1 - positive)

    def sets(self, probs: np.ndarray) -> list[str] | None:
        """Each image's conformal set, class names joined by ``SET_SEPARATOR`` ('' when empty); None when off."""
        if self.conformal_quantile is None:
            return None
        return [
            SET_SEPARATOR.join(c for c, inside in zip(self.classes, row, strict=True) if inside)
            for row in prediction_sets(probs, self.conformal_quantile)
        ]


def coverage_warning(
    alpha: float | None, coverage: float | None, low: float | None, high: float | None, selection: str
) -> str | None:
    """Why the conformal sets cannot be read at their nominal level, or None: the test coverage's 95% interval
    [``low``, ``high``] excludes the target 1 - ``alpha``."""
    if alpha is None or coverage is None or low is None or high is None:
        return None
    target = 1 - alpha
    if low <= target <= high:
        return None
    if high < target:
        why = (
            "the sets hold the truth less often than promised. The usual cause: the selection split "
            f"({selection}) the quantile was fitted on is not exchangeable with test (another source, site, "
            "period or patient mix); do not read the sets as guaranteeing their level"
        )
    else:
        why = "the sets are more cautious (larger) than the level needs"
    return (
        f"conformal sets' test coverage {coverage:.3f} (95% CI {low:.3f} – {high:.3f}) is "
        f"{'below' if high < target else 'above'} the target {target:.0%} (evaluate.conformal_alpha "
        f"{alpha:g}): {why}"
    )


def check(settings: Evaluate, n_classes: int) -> None:
    """Fail early when ``evaluate.threshold`` asks for a cut on a task that is not binary."""
    objective, number = parse_threshold(settings.threshold)
    if n_classes != 2 and (objective != "fixed" or number != 0.5):
        raise DecisionError(
            f"evaluate.threshold: {settings.threshold!r} needs a binary task; the data has "
            f"{n_classes} classes (set it to 0.5)"
        )


def decide(
    selection: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    positive: int | None,
    settings: Evaluate,
    seed: int,
    *,
    model_sha256: str = "",
    selection_name: str = "val",
) -> tuple[Decision, dict[str, float]]:
    """Fit the threshold and the conformal quantile on ``selection`` (probs, labels); score them on ``test``.

    Test labels are used only for the returned metrics, never for the decision itself.
    """
    (sel_probs, sel_labels), (test_probs, test_labels) = selection, test
    check(settings, len(class_names))
    metrics: dict[str, float] = {}
    threshold = None
    if positive is not None:
        threshold = choose_threshold(sel_probs[:, positive], sel_labels == positive, settings.threshold)
        metrics["decision/threshold"] = round(threshold, 6)
        sel = split_metrics(
            thresholded(sel_probs, positive, threshold),
            sel_labels,
            class_names,
            f"decision_{selection_name}",
            dataclasses.replace(settings, bootstrap=0),
            seed,
            positive,
            only=("sensitivity", "specificity"),
        )
        metrics |= sel
        if threshold != 0.5:
            metrics |= split_metrics(
                thresholded(test_probs, positive, threshold),
                test_labels,
                class_names,
                THRESHOLD_SPLIT,
                settings,
                seed,
                positive,
                only=THRESHOLDED,
            )
    quantile = None
    if settings.conformal_alpha is not None:
        quantile = conformal_quantile(sel_probs, sel_labels, settings.conformal_alpha)
        metrics |= conformal_metrics(
            test_probs,
            test_labels,
            quantile,
            settings.conformal_alpha,
            len(sel_labels),
            settings.bootstrap,
            seed,
        )
    if positive is not None and threshold is not None:
        metrics |= operating_point(test_probs, test_labels, positive, threshold)
    decision = Decision(
        model_sha256=model_sha256,
        classes=tuple(class_names),
        selection=selection_name,
        positive_class=None if positive is None else class_names[positive],
        threshold_rule=str(settings.threshold),
        threshold=threshold,
        conformal_alpha=settings.conformal_alpha,
        conformal_quantile=quantile,
        test_coverage=metrics.get("conformal/coverage"),
        test_coverage_ci_low=metrics.get("conformal/coverage_ci_low"),
        test_coverage_ci_high=metrics.get("conformal/coverage_ci_high"),
    )
    return decision, metrics


def operating_point(
    probs: np.ndarray, labels: np.ndarray, positive: int, threshold: float
) -> dict[str, float]:
    """Test counts at the cut predict applies: positives, misses (false negatives), false alarms (false
    positives), the prevalence of the positive class, and PPV / NPV (which depend on that prevalence)."""
    called = probs[:, positive] >= threshold
    truth = np.asarray(labels) == positive
    tp, fn = int((called & truth).sum()), int((~called & truth).sum())
    fp, tn = int((called & ~truth).sum()), int((~called & ~truth).sum())
    out = {
        "operating/threshold": round(threshold, 6),
        "operating/positives": tp + fn,
        "operating/negatives": fp + tn,
        "operating/true_positives": tp,
        "operating/misses": fn,
        "operating/false_alarms": fp,
        "operating/prevalence": round((tp + fn) / max(len(labels), 1), 6),
    }
    if tp + fp:
        out["operating/ppv"] = round(tp / (tp + fp), 6)
    if tn + fn:
        out["operating/npv"] = round(tn / (tn + fn), 6)
    return out


# --- the report's sections ---------------------------------------------------------------------------------


def _cell(metrics: Mapping[str, Any], key: str) -> list[str]:
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    value = f"{metrics[key]:.4f}" if key in metrics else "—"
    return [value, "—" if low is None or high is None else f"{low:.3f} – {high:.3f}"]


def threshold_table(metrics: Mapping[str, Any], threshold: float) -> str:
    """Thresholded metrics at 0.5 (``test/*``) and at the chosen cut (``test_threshold/*``), with 95% CIs."""
    rows = [["metric", "at 0.5", "95% CI", f"at {threshold:.3f}", "95% CI"], ["---"] * 5]
    rows += [
        [name, *_cell(metrics, f"test/{name}"), *_cell(metrics, f"{THRESHOLD_SPLIT}/{name}")]
        for name in THRESHOLDED
        if f"{THRESHOLD_SPLIT}/{name}" in metrics
    ]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def operating_text(metrics: Mapping[str, Any], decision: Decision) -> list[str]:
    """The cut's test counts in words (misses, false alarms), PPV / NPV beside the prevalence they hold at."""
    m, positive = metrics, decision.positive_class
    if "operating/positives" not in m or positive is None:
        return []
    negative = next(c for c in decision.classes if c != positive)
    n_pos, n_neg = int(m["operating/positives"]), int(m["operating/negatives"])
    lines = [
        f"At this cut, on the {n_pos + n_neg} test images ({n_pos} `{positive}`, {n_neg} `{negative}`; "
        f"prevalence of `{positive}` {m['operating/prevalence']:.1%}): **{int(m['operating/misses'])} of the "
        f"{n_pos} `{positive}` images are missed** (false negatives) and **{int(m['operating/false_alarms'])} "
        f"of the {n_neg} `{negative}` images are false alarms** (false positives)."
    ]
    values = [
        f"{name} {m[f'operating/{key}']:.3f}"
        for name, key in (("PPV (positive calls that are right)", "ppv"), ("NPV", "npv"))
        if f"operating/{key}" in m
    ]
    if values:
        lines += [
            "",
            f"{', '.join(values)}: both at the test prevalence {m['operating/prevalence']:.1%}. At a prevalence "
            "π where the model is used, PPV = sens·π / (sens·π + (1 − spec)(1 − π)).",
        ]
    if n_pos and n_neg and (abs(n_pos - n_neg) <= 1 or abs(n_pos / (n_pos + n_neg) - 0.5) <= BALANCED):
        lines += [
            "",
            f"**The test split is balanced ({n_pos} against {n_neg}), as a set drawn balanced by "
            "construction is**: its PPV and NPV hold at about 50% prevalence only, which is rarely a "
            "clinic's; recompute them at the prevalence of use before quoting them.",
        ]
    return lines


def report_sections(metrics: Mapping[str, Any], decision: Decision) -> list[tuple[str, str]]:
    """(heading, Markdown) sections: the threshold's metrics beside those at 0.5, and the conformal sets."""
    sections = []
    if decision.threshold is not None:
        how = f"`evaluate.threshold: {decision.threshold_rule}`"
        sel = f"decision_{decision.selection}"
        on_selection = (
            f"sensitivity {metrics.get(f'{sel}/sensitivity', float('nan')):.3f}, specificity "
            f"{metrics.get(f'{sel}/specificity', float('nan')):.3f}"
        )
        if parse_threshold(decision.threshold_rule or decision.threshold)[0] == "fixed":
            lines = [
                f"Positive class `{decision.positive_class}`; a fixed cut {decision.threshold:.4f} on its "
                f"probability ({how}: set, not fitted; on the {decision.selection} predictions it gives "
                f"{on_selection}). Set evaluate.threshold to an objective (youden, sensitivity:0.95, ...) to "
                f"choose the cut on the {decision.selection} predictions instead."
            ]
        else:
            lines = [
                f"Positive class `{decision.positive_class}`; cut {decision.threshold:.4f} on its probability "
                f"({how}), chosen on the {decision.selection} predictions ({on_selection} there) and applied "
                "unchanged to test and by predict."
            ]
        if f"{THRESHOLD_SPLIT}/accuracy" in metrics:
            lines += [
                "",
                threshold_table(metrics, decision.threshold),
                "",
                "AUROC, calibration and the per-class table do not depend on the cut (they are above). "
                f"`{THRESHOLD_SPLIT}/*` in reports/metrics.json are the numbers at this cut, the one predict "
                "applies; `test/*` are at 0.5.",
            ]
        else:
            lines += ["", "The cut is 0.5: the test metrics above are the ones at this threshold."]
        lines += ["", *operating_text(metrics, decision)]
        sections.append(("Decision threshold", "\n".join(lines)))
    if decision.conformal_quantile is not None:
        m, alpha = metrics, decision.conformal_alpha
        assert alpha is not None, "a conformal quantile is fitted at an alpha"

        def ci(k: str) -> str:
            return f" (95% CI {m[k + '_ci_low']:.3f} – {m[k + '_ci_high']:.3f})" if f"{k}_ci_low" in m else ""

        lines = [
            f"Split conformal (LAC) at alpha = {decision.conformal_alpha:g}, fitted on "
            f"{m['conformal/n_selection']} {decision.selection} predictions: a class is in an image's set "
            f"when its probability is at least {1 - decision.conformal_quantile:.4f}. Target coverage "
            f"{1 - alpha:.0%}.",
            "",
            "| | test |",
            "| --- | --- |",
            f"| coverage (truth in the set) | {m['conformal/coverage']:.3f}{ci('conformal/coverage')} |",
            f"| mean set size | {m['conformal/mean_set_size']:.3f}{ci('conformal/mean_set_size')} |",
            f"| single-class sets | {m['conformal/singleton_share']:.1%} |",
            f"| empty sets | {m['conformal/empty_share']:.1%} |",
            "",
            "An empty set means that no class reaches the cut: the model is not confident enough in any "
            "class for that image at this level. It is not a prediction of 'neither': send the image to a "
            "person. (LAC gives the smallest sets on average and may leave some empty; docs/evaluation.md "
            "says why no never-empty rule is offered.)",
        ]
        warning = coverage_warning(
            alpha,
            m.get("conformal/coverage"),
            m.get("conformal/coverage_ci_low"),
            m.get("conformal/coverage_ci_high"),
            decision.selection,
        )
        if warning:
            lines += ["", f"**Warning: the {warning}.**"]
        if decision.conformal_quantile >= 1:
            lines += [
                "",
                f"**The selection set is too small for alpha {decision.conformal_alpha:g}** (it needs at "
                f"least {math.ceil(1 / alpha - 1)} images): every set holds every class.",
            ]
        sections.append(("Conformal prediction sets", "\n".join(lines)))
    return sections

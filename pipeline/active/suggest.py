"""The suggest command's work: rank the unlabelled pool with what ships, pick a diverse batch, write it out.

Uncertainty comes from the shipped model, not a new one: the fold ensemble's members are the draws, else the
single model's test-time views (``evaluate.tta``), else (a domain without TTA, such as radiographs) draws of
the training augmentation, which only ever makes views the model was trained to call the same image. The
features that keep a batch diverse are the shipped network's penultimate layer; typicality clusters the
frozen features of the network ``model.weights`` starts from when those are pretrained (the shipped network's
otherwise), and before any model has trained both are the starting network's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import mlflow
import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import augment
from pipeline.active import acquisition
from pipeline.config import Params
from pipeline.data import rounds, validation
from pipeline.data.pooled import Pool, load_pool
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.display import image_grid
from pipeline.errors import PipelineError
from pipeline.evaluation.predictions import predict_proba
from pipeline.fsutil import atomic_file
from pipeline.runinfo import RUN_INFO
from pipeline.training.fit import build_model
from pipeline.training.model import Classifier, to_unit_range


class SuggestError(PipelineError, ValueError):
    """Nothing to suggest from, or a strategy that needs what is not there; the message says what to do."""


AUGMENTED_DRAWS = 8  # training-augmentation views per image when there are neither folds nor TTA views
COLUMNS = ("path", "rank", "score", "predicted", "probability", "why")


@dataclass(frozen=True)
class Suggestion:
    table: pd.DataFrame  # COLUMNS, one row per pick, best first
    strategy: str  # what auto resolved to
    labels: int  # labelled training images when it was made
    draws: int  # probability draws per image (members or views); 0 without a trained model
    round: int | None = None  # the set's round once labels were added (rounds.json); None: by the label count


def draws(
    members: list[Classifier],
    images: Any,
    batch_size: int,
    tta: list[A.BasicTransform],
    train_transform: A.BasicTransform | None,
) -> np.ndarray:
    """(N, classes, draws) probabilities: one per fold member, else the image and its TTA views, else the
    image and ``AUGMENTED_DRAWS`` training-augmentation views."""
    if len(members) > 1:
        return np.stack([predict_proba(m, images, batch_size) for m in members], axis=-1)
    model = members[0]
    views = [predict_proba(model, images, batch_size)]
    views += [predict_proba(model, images, batch_size, t) for t in tta]
    if len(views) < 2 and train_transform is not None:
        views += [predict_proba(model, images, batch_size, train_transform) for _ in range(AUGMENTED_DRAWS)]
    return np.stack(views, axis=-1)


@torch.no_grad()
def features(model: Classifier, images: Any, batch_size: int) -> np.ndarray:
    """The network's penultimate features (after global pooling) of cached images, normalized as it is."""
    body = nn.Sequential(*list(model.net.children())[:-1]).eval()  # a torchvision ResNet without its fc
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(
            np.array(images[start : start + batch_size])
        )  # a copy: the cache is read-only
        x = (to_unit_range(batch.permute(0, 3, 1, 2)) - model.mean) / model.std
        out.append(body(x).flatten(1).numpy())
    return np.concatenate(out) if out else np.empty((0, 0))


def duplicate_sets(pool: Pool, near_bits: int | None) -> np.ndarray:
    """A set id per kept pool image: near duplicates (dHash) and one group (a DICOM patient) share one."""
    kept = pool.kept()
    hashes = [
        None if not h else np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in kept["dhash"]
    ]
    near = validation.near_groups(hashes, near_bits) if near_bits is not None else np.arange(len(kept))
    links = validation.group_links(near.tolist()) + validation.group_links(kept["group"].tolist())
    return validation.components(len(kept), links)


def suggest(
    params: Params,
    budget: int,
    strategy: acquisition.Strategy,
    members: list[Classifier] | None,
    prepared: Prepared | None = None,
    pool: Pool | None = None,
    pretrained: bool | None = None,
) -> tuple[Suggestion, np.ndarray]:
    """The batch to label next and the pool rows it names (for the contact sheet). ``members``: the shipped
    model (one, or the fold members), or None before any model has trained; ``pretrained``: whether that model
    started from pretrained weights (its run.json's ``weights.pretrained``; None: whether ``model.weights``
    names any), which decides ``auto``'s cold start (``acquisition.resolve``)."""
    paths = params.paths
    prepared = prepared or load_prepared(Path(paths.prepared))
    pool = pool or load_pool(Path(paths.pool))
    if len(pool) == 0:
        raise SuggestError(
            f"pool {pool.name}: no image is left to label (every one was excluded or labelled)"
        )
    train = prepared.split("train")
    counts = train["label"].value_counts().reindex(prepared.classes, fill_value=0).tolist()
    batch = params.evaluate.batch_size
    if members:
        network = members[0]
        pretrained = params.model.weights != "none" if pretrained is None else pretrained
    else:
        network, pretrained = _starting_network(params, prepared)
    pool_features = features(network, pool.images, batch)
    probs = None
    if members:
        tta = augment.build_tta(list(params.evaluate.tta))
        train_transform = augment.load(Path(paths.augment_pipeline), params.seed)
        probs = draws(members, pool.images, batch, tta, train_transform)
    chosen = acquisition.resolve(
        strategy, counts if members else None, 0 if probs is None else probs.shape[-1], pretrained
    )
    if chosen in ("margin", "entropy", "bald") and probs is None:
        raise SuggestError(
            f"suggest --strategy {chosen} needs a trained model ({Path(paths.model_dir) / RUN_INFO} not "
            "found): run dvc repro, or use --strategy typical (or auto) for a cold start"
        )
    if chosen == "typical":
        # TypiClust clusters frozen features. A model fine-tuned on a few labels per class has bent pretrained
        # ones towards those labels, so they are taken from the weights it started from; a random init's
        # features carry nothing, so without pretrained weights they are the model's.
        frozen = _starting_network(params, prepared)[0] if members and pretrained else network
        typical_pool = pool_features if frozen is network else features(frozen, pool.images, batch)
        labelled = features(frozen, prepared.images[train["cache_index"].to_numpy()], batch)
        ranked = acquisition.rank_typical(typical_pool, labelled, budget, params.seed)
    elif chosen == "random":
        ranked = acquisition.rank_random(len(pool), params.seed)
    else:
        assert probs is not None
        ranked = acquisition.rank_uncertain(chosen, probs)
    picks = acquisition.diverse(
        ranked, budget, duplicate_sets(pool, params.data.near_duplicate_bits), pool_features, params.seed
    )
    kept = pool.kept()
    mean = None if probs is None else probs.mean(axis=-1)
    table = pd.DataFrame(
        {
            "path": kept["path"].to_numpy()[picks],
            "rank": np.arange(1, len(picks) + 1),
            "score": np.round(ranked.scores[picks], 6),
            "predicted": "" if mean is None else np.asarray(prepared.classes)[mean[picks].argmax(1)],
            "probability": np.nan if mean is None else np.round(mean[picks].max(1), 4),
            "why": [ranked.reasons[i] for i in picks],
        },
        columns=list(COLUMNS),
    )
    draws_n = 0 if probs is None else probs.shape[-1]
    added = (prepared.report.get("active") or {}).get("round")  # intake --add was run: the set counts rounds
    suggestion = Suggestion(table, chosen, len(train), draws_n, None if added is None else int(added))
    return suggestion, np.asarray(picks, dtype=np.int64)


def _starting_network(params: Params, prepared: Prepared) -> tuple[Classifier, bool]:
    """Before any training: the network ``model.weights`` starts from, for its features (a random init is
    drawn from ``seed``, so a cold start suggests the same images each time it is asked), and whether those
    weights were pretrained ones."""
    with torch.random.fork_rng():
        torch.manual_seed(params.seed)
        return _built(params, prepared)


def _built(params: Params, prepared: Prepared) -> tuple[Classifier, bool]:
    model, info = build_model(
        params,
        prepared.classes,
        dataset_stats=(prepared.mean, prepared.std),
        in_channels=prepared.images.shape[-1],
        pixel_dtype=str(prepared.images.dtype),
    )
    return model.eval(), info.pretrained


def contact_sheet(pool: Pool, picks: np.ndarray, suggestion: Suggestion, out: Path) -> None:
    """The picks as a grid, rank and (with a model) predicted class and probability under each."""
    rows = suggestion.table
    titles = [
        f"#{r.rank}" + (f" {r.predicted} {r.probability:.2f}" if r.predicted else "")
        for r in rows.itertuples()
    ]
    figure = image_grid(
        [np.asarray(pool.images[i]) for i in picks],
        titles,
        ncols=min(8, max(1, len(picks))),
        cell=(1.5, 1.7),
        suptitle=f"suggest: {len(picks)} to label next ({suggestion.strategy}, {suggestion.labels} labels so far)",
        suptitle_height=0.4,
    )
    figure.savefig(out, dpi=100)


def write(suggestion: Suggestion, pool: Pool, picks: np.ndarray, csv: Path, sheet: Path) -> None:
    """``csv`` and its contact sheet, each replaced only when complete."""
    with atomic_file(csv) as tmp:
        suggestion.table.to_csv(tmp, index=False)
    with atomic_file(sheet) as tmp:
        contact_sheet(pool, picks, suggestion, tmp)


def round_number(previous_labels: list[int], labels: int) -> int:
    """Before any ``intake --add``, rounds are told apart by the labelled count: a suggestion at a count seen
    before is that round again. After one, the set's own round (``rounds.json``) is the round."""
    return sorted(set(previous_labels) | {labels}).index(labels) + 1


def record(suggestion: Suggestion, params: Params, dataset: str, csv: Path, sheet: Path) -> int:
    """An MLflow run for the suggestion (``suggest:<dataset>``) with its round and label count as tags and
    metrics, and the CSV and sheet as artifacts; returns the round."""
    earlier = mlflow.search_runs(
        filter_string=f"tags.stage = 'suggest' and tags.`data.dataset` = '{dataset}'", output_format="list"
    )
    labels = [int(run.data.metrics["al/labels"]) for run in earlier if "al/labels" in run.data.metrics]
    number = suggestion.round or round_number(labels, suggestion.labels)
    tags = {
        "stage": "suggest",
        "data.dataset": dataset,
        "al.round": str(number),
        "al.strategy": suggestion.strategy,
        "data.unlabelled": str(params.data.unlabelled),
        rounds.ROUND_TAG: str(number),
        rounds.LABELS_TAG: str(suggestion.labels),
    }
    with mlflow.start_run(run_name=f"suggest:{dataset}:round-{number}", tags=tags):
        mlflow.log_metrics(
            {"al/round": number, "al/labels": suggestion.labels, "al/budget": len(suggestion.table)}
        )
        mlflow.log_artifact(str(csv))
        mlflow.log_artifact(str(sheet))
    return number

"""augment: build the training pipeline from params, serialize it, draw a preview grid and any offline copies."""

import argparse
from pathlib import Path

from pipeline import augment
from pipeline.config import Params
from pipeline.data.cache import OFFLINE_IMAGES, OFFLINE_LABELS, Rows
from pipeline.data.prepared import load_prepared
from pipeline.display import augment_preview
from pipeline.fsutil import atomic_dir, atomic_file


def main(params: Params, args: argparse.Namespace) -> None:
    a, paths = params.augment, params.paths
    prepared = load_prepared(Path(paths.prepared))
    pipeline = augment.build(a.transforms, params.seed, preset=a.preset, dtype=prepared.images.dtype)
    with atomic_file(paths.augment_pipeline) as tmp:
        augment.save(pipeline, tmp)

    train = prepared.split("train")
    # Round-robin over the classes, so every class shows up before any repeats.
    shuffled = train.sample(frac=1.0, random_state=params.seed)
    order = shuffled.groupby("label").cumcount().sort_values(kind="stable").index
    rows = shuffled.loc[order[: a.preview_images]].sort_values("label", kind="stable")
    pipeline.set_random_seed(params.seed)
    with atomic_file(paths.augment_preview) as tmp:
        augment_preview(
            pipeline,
            prepared.images[rows["cache_index"].to_numpy()],
            rows["label"].tolist(),
            a.preview_draws,
            tmp,
        )

    # Written even when empty, so train and tune always have the dependency DVC declares.
    pipeline.set_random_seed(params.seed)
    # The train split read per image and the copies written per image: bounded memory at any set size.
    source = Rows(prepared.images, train["cache_index"].to_numpy())
    with atomic_dir(paths.augment_offline) as staging:
        n_copies = augment.write_offline_copies(
            pipeline,
            source,
            train["label_index"].to_numpy(),
            a.offline_copies,
            staging / OFFLINE_IMAGES,
            staging / OFFLINE_LABELS,
        )
    print(
        f"augment: preset {a.preset}, {len(pipeline.transforms)} transforms -> {paths.augment_pipeline}; "
        f"preview {paths.augment_preview}; {n_copies} offline copies -> {paths.augment_offline}"
    )

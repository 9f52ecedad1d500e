"""augment: build the training pipeline from params, serialize it, and draw a preview grid."""

from pathlib import Path

from pipeline import augment
from pipeline.config import Params
from pipeline.data.ingest import load_prepared
from pipeline.fsutil import atomic_file


def main(params: Params) -> None:
    a, paths = params.augment, params.paths
    pipeline = augment.build(a.transforms, params.seed)
    with atomic_file(paths.augment_pipeline) as tmp:
        augment.save(pipeline, tmp)

    prepared = load_prepared(Path(paths.prepared))
    train = prepared.split("train")
    # Round-robin over the classes, so every class shows up before any repeats.
    shuffled = train.sample(frac=1.0, random_state=params.seed)
    order = shuffled.groupby("label").cumcount().sort_values(kind="stable").index
    rows = shuffled.loc[order[:a.preview_images]].sort_values("label", kind="stable")
    pipeline.set_random_seed(params.seed)
    with atomic_file(paths.augment_preview) as tmp:
        augment.preview(pipeline, prepared.images[rows["cache_index"].to_numpy()], rows["label"].tolist(),
                        a.preview_draws, tmp)
    print(f"augment: {len(a.transforms)} transforms -> {paths.augment_pipeline}; preview {paths.augment_preview}")

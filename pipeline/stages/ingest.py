"""ingest: validate and split paths.raw/data.dataset, cache its decoded pixels in paths.prepared."""

from pathlib import Path

from pipeline.config import Params
from pipeline.data.ingest import ingest


def main(params: Params) -> None:
    d = params.data
    report = ingest(Path(params.paths.raw) / d.dataset, Path(params.paths.prepared), image_size=d.image_size,
                    val_fraction=d.val_fraction, test_fraction=d.test_fraction, seed=params.seed,
                    on_bad_file=d.on_bad_file)
    print(f"ingest: {report['n_images']} images, {len(report['classes'])} classes "
          f"({len(report['rejected'])} unreadable skipped, {report['ignored_non_images']} non-image files ignored)")
    for split, counts in report["counts"].items():
        print(f"  {split:5s} " + "  ".join(f"{c}={n}" for c, n in counts.items()))

"""predict SRC --out preds.csv: class probabilities for new images, preprocessed exactly as for training.

SRC is a folder of images (nested or flat) or a CSV manifest with a 'path' column (paths relative to
its folder). Each file gets a row: path, predicted, prob_<class> per class, error (unreadable files:
the reason, and no prediction). Fails only when no file at all could be read. When the evaluate stage
recorded a decision for this model (paths.decision), predicted applies its threshold and a 'set' column
holds each image's conformal prediction set (class names joined by '|').
"""

import argparse
from pathlib import Path

from pipeline.config import Params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src", type=Path, metavar="SRC", help="folder of images, or a CSV with a 'path' column"
    )
    parser.add_argument(
        "--out", type=Path, metavar="CSV", required=True, help="CSV to write (replaced only when complete)"
    )
    parser.add_argument(
        "--model-dir", type=Path, metavar="DIR", help="the train stage's output (default: paths.model_dir)"
    )
    parser.add_argument(
        "--decision",
        type=Path,
        metavar="FILE",
        help="evaluate's threshold and conformal quantile, applied if present (default: paths.decision)",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from pipeline.serve import predict, shipped

    shipped.check_out(args.out)
    trained = shipped.load_trained(args.model_dir or Path(params.paths.model_dir))
    made = predict.load_decision(args.decision or Path(params.paths.decision), trained)
    table = predict.predict(
        trained,
        predict.list_images(args.src),
        params.evaluate.batch_size,
        made,
        max_pixels=params.data.max_image_pixels,
    )
    predict.write_predictions(table, args.out)
    failed = int((table["error"] != "").sum())
    print(f"predict: {len(table) - failed} images predicted, {failed} unreadable -> {args.out}")
    if failed == len(table):
        raise shipped.ServeError(
            f"{args.src}: none of the {failed} files could be read (reasons in {args.out})"
        )

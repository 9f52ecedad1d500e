"""export --format torchscript|onnx [--out PATH]: the trained model as one file with its preprocessing.

The file takes raw image batches, (N, H, W, C) or (N, C, H, W) at any size, and returns class
probabilities; resizing as ingest does, scaling and normalization are inside, and the class names
are embedded (TorchScript: the ``class_names`` attribute and the extra file class_names.json;
ONNX: the metadata property ``class_names``).
"""

import argparse
from pathlib import Path

from pipeline.config import Params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["torchscript", "onnx"], required=True)
    parser.add_argument(
        "--out",
        type=Path,
        metavar="OUT",
        help="file to write (default: paths.exports/model.pt or model.onnx)",
    )
    parser.add_argument(
        "--gray",
        action="store_true",
        help="onnx of an RGB model trained on gray images (X-rays, data.channels: rgb): take (N, H, W, 1) and "
        "replicate the band inside, as ingest did (TorchScript takes 1 or 3 bands without it)",
    )
    parser.add_argument(
        "--model-dir", type=Path, metavar="DIR", help="the train stage's output (default: paths.model_dir)"
    )


def _train_run(params: Params, sha256: str) -> str | None:
    """The MLflow train run of the model (found by its model.sha256 tag); None, with a warning, where the store
    does not have it: the file then names the model by its sha256 only (models/ pulled without the store)."""
    from pipeline import tracking
    from pipeline.stages.tracked import open_tracking

    try:
        open_tracking(params)
        return tracking.model_run(sha256).info.run_id
    except tracking.TrackingError as err:
        print(f"warning: {err}; the exported file records the model's sha256 without its MLflow run")
        return None


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from pipeline.serve import export, shipped

    out = args.out or Path(params.paths.exports) / f"model{export.SUFFIX[args.format]}"
    shipped.check_out(out)
    trained = shipped.load_trained(args.model_dir or Path(params.paths.model_dir))
    run_id = _train_run(params, trained.run.model_sha256)
    export.export(trained, args.format, out, gray=args.gray, run_id=run_id)
    print(
        f"export: {args.format} model {trained.run.model_sha256[:12]} (MLflow run {run_id or 'not found'}) -> "
        f"{out} (resizes to "
        f"{trained.image_size} px, {1 if args.gray else trained.in_channels} bands; classes {', '.join(trained.classes)})"
    )

"""size: resolve data.image_size (auto: the size the starting weights were trained at, or the images' own size
capped for random init) into paths.image_size, which ingest reads; weights that can be downloaded are obtained
into the cache training reads them from."""

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.data.sizing import resolve_size
from pipeline.stages import dataset_dir


def main(params: Params, args: argparse.Namespace) -> None:
    m = params.model
    native = None
    if params.data.image_size == "auto":
        # Here, not at the top: a number in params.yaml then costs no torch import (20-38 s on a busy machine).
        from pipeline.training.pretrained import native_size

        native = native_size(
            m.arch,
            m.weights,
            require_pretrained=m.require_pretrained,
            pretrain_weights=params.pretrain.weights,
            sha256=m.weights_sha256,
            tracking_uri=params.mlflow.tracking_uri,
        )
    resolved = resolve_size(params.data, dataset_dir(params), native)
    resolved.write(Path(params.paths.image_size))
    print(f"size: {resolved.reason} -> {params.paths.image_size}")

"""The shipped model as one file: TorchScript or ONNX, :class:`~pipeline.serve.shipped.Packaged` (preprocessing
inside) with its class names and input contract beside the weights.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from pipeline.fsutil import atomic_file
from pipeline.serve.shipped import Format, Packaged, Trained, example_batch, metadata, package

CLASS_NAMES_FILE = "class_names.json"  # TorchScript extra file
SUFFIX = {"torchscript": ".pt", "onnx": ".onnx"}


def export(trained: Trained, fmt: Format, out: Path, gray: bool = False, run_id: str | None = None) -> Path:
    """Write the :class:`Packaged` model as TorchScript or ONNX to ``out`` (replaced only on success); ``gray``:
    an ONNX file of an RGB model that takes one band (TorchScript takes 1 or 3 bands either way); ``run_id``:
    the MLflow train run of the model, recorded as ``mlflow_run_id`` beside its sha256."""
    packaged = package(trained, onnx=fmt == "onnx", gray=gray)  # refuses gray where it means nothing
    meta = metadata(trained, fmt, gray) | ({"mlflow_run_id": run_id} if run_id else {})
    with atomic_file(out) as tmp, torch.no_grad():
        if fmt == "torchscript":
            # Deprecated in recent torch in favour of torch.export, but still what libtorch (C++) loads.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
                scripted = torch.jit.script(packaged)
                torch.jit.save(
                    scripted,
                    str(tmp),
                    _extra_files={CLASS_NAMES_FILE: meta["class_names"], "metadata.json": json.dumps(meta)},
                )
        else:
            _export_onnx(packaged, example_batch(trained, gray), tmp, meta)
    return out


def _export_onnx(packaged: Packaged, example: torch.Tensor, out: Path, meta: dict[str, str]) -> None:
    import onnx

    # Batch, height and width are dynamic; the band axis is fixed (PackagedNHWC).
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")}
    program = torch.onnx.export(
        packaged,
        (example,),
        None,
        input_names=["images"],
        output_names=["probabilities"],
        dynamic_shapes={"images": dims},
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    assert program is not None, "torch.onnx.export(dynamo=True) returns the program"
    model = program.model_proto
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save_model(model, str(out))

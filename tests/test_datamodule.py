import argparse
import dataclasses

import numpy as np
import pytest

from pipeline.config import with_overrides
from pipeline.data.prepared import DataError, load_prepared
from pipeline.stages import augment as augment_stage
from pipeline.training.fit import datamodule
from tests.conftest import run_script


@pytest.fixture
def offline_params(tiny_params, prepared, tmp_path):
    """tiny_params writing the augment stage's outputs under tmp_path, with 2 offline copies."""
    paths = dataclasses.replace(
        tiny_params.paths,
        prepared=str(tmp_path / "prepared"),
        augment_pipeline=str(tmp_path / "augment" / "t.json"),
        augment_preview=str(tmp_path / "augment" / "preview.png"),
        augment_offline=str(tmp_path / "augment" / "offline"),
    )
    return with_overrides(dataclasses.replace(tiny_params, paths=paths), {"augment.offline_copies": 2})


def test_offline_copies_from_the_augment_stage_join_the_train_split_only(offline_params, prepared):
    augment_stage.main(offline_params, argparse.Namespace())
    data = datamodule(offline_params, prepared, None)
    n_train = len(prepared.split("train"))
    train = data.dataset("train")
    assert len(train) == 3 * n_train and len(data.dataset("val")) == len(prepared.split("val"))
    # Each copy keeps its source image's label, and is an augmented draw, not a duplicate.
    source = prepared.split("train")["label_index"].to_numpy()
    assert train.labels[n_train:].tolist() == np.repeat(source, 2).tolist()
    changed = (train.images[n_train:] != np.repeat(train.images[:n_train], 2, axis=0)).any(axis=(1, 2, 3))
    assert changed.mean() > 0.5
    assert (
        len(
            datamodule(with_overrides(offline_params, {"augment.offline_copies": 0}), prepared, None).dataset(
                "train"
            )
        )
        == n_train
    )


def test_missing_or_stale_offline_copies_say_what_to_run(offline_params, prepared):
    with pytest.raises(DataError, match="run the augment stage first"):
        datamodule(offline_params, prepared, None)
    augment_stage.main(offline_params, argparse.Namespace())
    with pytest.raises(DataError, match=r"expected .* \(augment.offline_copies=3\); rerun the augment stage"):
        datamodule(with_overrides(offline_params, {"augment.offline_copies": 3}), prepared, None)


DDP_VALIDATE = """
import json, sys
from pathlib import Path
import lightning.pytorch as L, torch
from pipeline.data.prepared import load_prepared
from pipeline.data.datamodule import ImageDataModule
from pipeline.training.model import Classifier
from pipeline.config import Model

prepared_dir, out, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
prepared = load_prepared(prepared_dir)
torch.manual_seed(0)
model = Classifier(Model(arch="resnet18", stem="small", weights="none"), num_classes=len(prepared.classes))
if devices == 1:
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
data = ImageDataModule(prepared, None, batch_size=4)
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                    enable_progress_bar=False, enable_model_summary=False)
metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
if trainer.is_global_zero:
    if devices > 1:
        torch.save(model.state_dict(), out / "weights.pt")
    (out / f"val-{devices}.json").write_text(json.dumps(metrics))
"""


@pytest.mark.slow
def test_ddp_validation_counts_each_image_once(image_folder, tmp_path):
    """9 val images on 2 processes (5 and 4: a rank runs one batch more): every metric equals the one process
    value; a padding sampler would score one image twice."""
    import json

    from pipeline.data.ingest import ingest

    ingest(
        image_folder, tmp_path / "prepared", image_size=32, val_fraction=0.375, test_fraction=0.125, seed=0
    )
    assert len(load_prepared(tmp_path / "prepared").split("val")) == 9
    for devices in (2, 1):
        run_script(DDP_VALIDATE, tmp_path, str(tmp_path / "prepared"), str(tmp_path), str(devices))
    two, one = (json.loads((tmp_path / f"val-{d}.json").read_text()) for d in (2, 1))
    assert set(two) == set(one) and "val/auroc" in one
    for name, value in one.items():
        assert two[name] == pytest.approx(value, abs=1e-6), name

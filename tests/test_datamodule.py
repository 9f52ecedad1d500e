import argparse
import dataclasses

import numpy as np
import pytest

from pipeline.config import with_overrides
from pipeline.data.prepared import DataError
from pipeline.stages import augment as augment_stage
from pipeline.training.fit import datamodule


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

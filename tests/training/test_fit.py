import json
from pathlib import Path

import pytest
import torch

from pipeline import augment
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier

TRANSFORMS = [{"name": "HorizontalFlip", "p": 0.5}]


def test_tiny_fit_saves_the_best_checkpoint_and_logs_the_vocabulary(tiny_params, prepared, tmp_path):
    data = datamodule(tiny_params, prepared, augment.build(TRANSFORMS, seed=0))
    result = fit(tiny_params, data, out_dir=tmp_path / "ckpt")
    assert result.best_checkpoint == tmp_path / "ckpt" / "best.ckpt" and result.best_checkpoint.is_file()
    assert result.epochs_run == 2 and not result.weights.pretrained
    for name in (
        "train/loss",
        "train/accuracy",
        "val/loss",
        "val/accuracy",
        "val/balanced_accuracy",
        "val/auroc",
        "val/macro_f1",
    ):
        assert name in result.last_metrics, name
    model = Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")
    assert model.hparams.class_names == list(prepared.classes)
    # The model normalizes raw pixels itself: uint8 and the same pixels as floats in [0, 1] agree.
    x = torch.from_numpy(prepared.images[:2].transpose(0, 3, 1, 2).copy())
    model.eval()
    assert torch.allclose(model(x), model(x.float() / 255), atol=1e-5)


def test_checkpoint_last_runs_the_whole_schedule_and_ships_its_end(tiny_params, prepared, tmp_path):
    from pipeline.config import with_overrides

    # patience 1 on val/loss would stop a 4-epoch run early; checkpoint: last runs all 4 and ships the 4th.
    params = with_overrides(
        tiny_params,
        {"train.checkpoint": "last", "train.max_epochs": 4, "train.patience": 1, "train.monitor": "val/loss"},
    )
    result = fit(params, datamodule(params, prepared, None), out_dir=tmp_path / "ckpt")
    assert result.epochs_run == 4
    shipped = torch.load(result.best_checkpoint, weights_only=False)
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert shipped["epoch"] == final["epoch"] == 3
    torch.testing.assert_close(shipped["state_dict"], final["state_dict"], rtol=0, atol=0)
    assert result.best_score == pytest.approx(result.last_metrics["val/loss"])


def test_same_seed_same_validation_metrics(tiny_params, prepared):
    runs = [
        fit(tiny_params, datamodule(tiny_params, prepared, augment.build(TRANSFORMS, seed=0)))
        for _ in range(2)
    ]
    assert runs[0].last_metrics == runs[1].last_metrics


def test_a_diverging_loss_stops_with_a_message_and_no_checkpoint(tiny_params, prepared, tmp_path):
    import pytest

    from pipeline.config import with_overrides
    from pipeline.training.fit import TrainingDiverged

    params = with_overrides(
        tiny_params,
        {"train.lr": 9.0, "train.optimizer": "sgd", "train.warmup_epochs": 0, "train.label_smoothing": 0.0},
    )
    with pytest.raises(TrainingDiverged, match=r"lower train.lr"):
        fit(params, datamodule(params, prepared, None), out_dir=tmp_path / "ckpt", max_epochs=20)
    assert not (tmp_path / "ckpt" / "best.ckpt").exists()


def test_each_epoch_line_shows_that_epochs_own_train_and_val_metrics(tiny_params, prepared, capsys, caplog):
    import re
    import warnings
    from typing import ClassVar

    from lightning.pytorch.loggers import Logger

    class Recorder(Logger):  # what MLflow receives, per epoch
        name, version = "recorder", "0"
        logged: ClassVar[list[dict]] = []

        def log_hyperparams(self, params, *args, **kwargs) -> None:
            pass

        def log_metrics(self, metrics, step=None) -> None:
            self.logged.append(dict(metrics))

    recorder = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tiny_params, datamodule(tiny_params, prepared, None), logger=recorder)
    assert not [w for w in caught if "LeafSpec" in str(w.message)]  # raised by Lightning itself, every fit
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    for noise in (
        "GPU available",
        "TPU available",
        "litlogger",
        "stepping batches",
        "LeafSpec",
        "Trainer.fit",
    ):
        assert noise not in out + err + caplog.text, (
            noise
        )  # Lightning's per-Trainer lines, silenced at the source
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]  # one per epoch, the last included
    for line, epoch in zip(lines, range(2), strict=True):
        shown = dict(re.findall(r"(\S+)=(\S+)", line))
        logged = {k: v for m in recorder.logged if m.get("epoch") == epoch for k, v in m.items()}
        for name in ("train/loss", "val/loss", "val/accuracy"):
            assert float(shown[name]) == pytest.approx(logged[name], abs=1e-4), (line, name)


def test_a_long_epoch_prints_progress_lines(capsys):
    from types import SimpleNamespace

    from pipeline.training.callbacks import EpochSummary

    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, max_epochs=3, num_training_batches=50)
    summary = EpochSummary(every_s=3600)
    summary.on_train_epoch_start(trainer, None)
    summary.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 9)
    assert capsys.readouterr().out == ""  # a short epoch: nothing between epoch lines
    summary.every_s = 0
    summary.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 9)
    assert capsys.readouterr().out == "epoch 1/3  batch 10/50  train/loss (batch)=0.5000\n"


def _val_loss(model, prepared, label_smoothing):
    rows = prepared.split("val")
    x = torch.from_numpy(prepared.images[rows["cache_index"].to_numpy()].transpose(0, 3, 1, 2).copy())
    y = torch.tensor(rows["label_index"].to_numpy())
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), y, label_smoothing=label_smoothing).item()


def test_ema_weights_are_the_validated_and_checkpointed_ones_and_resume(tiny_params, prepared, tmp_path):
    import lightning.pytorch as L

    from pipeline.config import with_overrides

    params = with_overrides(
        tiny_params,
        {
            "train.ema_decay": 0.9,
            "train.monitor": "val/loss",
            "augment.mixup_alpha": 0.4,
            "augment.cutmix_alpha": 1.0,
        },
    )
    straight = fit(params, datamodule(params, prepared, None), out_dir=tmp_path / "straight")
    best = Classifier.load_from_checkpoint(straight.best_checkpoint, map_location="cpu")
    # The checkpoint holds the averaged weights, and they are the ones val/loss was measured on.
    assert _val_loss(best, prepared, params.train.label_smoothing) == pytest.approx(
        straight.best_score, abs=1e-4
    )
    saved = torch.load(straight.best_checkpoint, weights_only=False)
    assert "optimizer_states" not in saved and "current_model_state" not in saved  # slimmed to weights only
    last = torch.load(tmp_path / "straight" / "last.ckpt", weights_only=False)
    steps = int(last["averaging_state"]["n_averaged"])
    assert steps == last["global_step"] > 0
    averaged, current = last["state_dict"], last["current_model_state"]
    assert not torch.equal(averaged["net.fc.weight"], current["net.fc.weight"])

    class StopAfterFirstEpoch(L.Callback):  # a run killed after its first epoch
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    out = tmp_path / "resumed"
    fit(params, datamodule(params, prepared, None), out_dir=out, callbacks=[StopAfterFirstEpoch()])
    fit(params, datamodule(params, prepared, None), out_dir=out, resume_from=out / "last.ckpt")
    resumed = torch.load(out / "last.ckpt", weights_only=False)
    # The average went on from the checkpoint (a restarted one would count only the second epoch's steps).
    assert int(resumed["averaging_state"]["n_averaged"]) == steps == resumed["global_step"]


def test_run_json_records_which_checkpoint_ships_and_reads_older_files_as_best():
    from pipeline.runinfo import RunInfo
    from tests.conftest import run_info

    last = run_info(checkpoint="last")
    assert RunInfo.from_dict(last.as_dict()) == last
    older = {k: v for k, v in run_info().as_dict().items() if k != "checkpoint"}  # before train.checkpoint
    assert RunInfo.from_dict(older).checkpoint == "best"
    averaged = run_info(ema_decay=0.995)
    assert RunInfo.from_dict(averaged.as_dict()) == averaged
    assert RunInfo.from_dict({k: v for k, v in older.items() if k != "ema_decay"}).ema_decay is None


def test_run_json_records_the_ema_only_where_the_training_step_used_it(tiny_params, prepared, tmp_path):
    from pipeline.config import with_overrides
    from pipeline.runinfo import WeightsInfo
    from pipeline.training import train as training
    from pipeline.training.fit import FitResult, Fitted

    result = FitResult(
        0.9, None, 2, WeightsInfo(requested="none", source="random-init", pretrained=False), {}
    )
    (tmp_path / "best.ckpt").write_bytes(b"weights")
    fitted = Fitted([result], {"best.ckpt": tmp_path / "best.ckpt"}, None)
    for mode, expected in (("finetune", 0.995), ("linear_probe", None), ("knn", None)):
        params = with_overrides(tiny_params, {"train.ema_decay": 0.995, "train.mode": mode})
        assert training.run_info(params, prepared, fitted).ema_decay == expected
    off = with_overrides(tiny_params, {"train.ema_decay": 0.0})
    assert training.run_info(off, prepared, fitted).ema_decay is None


def test_run_json_names_the_model_by_its_checkpoints_sha256_and_holds_no_run_id(
    tiny_params, prepared, tmp_path
):
    """run.json is a DVC output: the same bytes for the same weights (dvc.lock reproduces in a fresh clone). The
    model's identity is the SHA-256 of its checkpoint, or of the fold members' bytes in order."""
    import hashlib

    from pipeline.runinfo import RunInfo, WeightsInfo
    from pipeline.training import train as training
    from pipeline.training.fit import FitResult, Fitted

    result = FitResult(
        0.9, None, 2, WeightsInfo(requested="none", source="random-init", pretrained=False), {}
    )
    (tmp_path / "best.ckpt").write_bytes(b"weights")
    info = training.run_info(
        tiny_params, prepared, Fitted([result], {"best.ckpt": tmp_path / "best.ckpt"}, None)
    )
    assert info.model_sha256 == hashlib.sha256(b"weights").hexdigest()
    written = json.loads(info.write(tmp_path).read_text())
    assert "run_id" not in written and written["model_sha256"] == info.model_sha256
    assert RunInfo.read(tmp_path) == info
    (tmp_path / "fold_0.ckpt").write_bytes(b"first")
    (tmp_path / "fold_1.ckpt").write_bytes(b"second")
    members = {"fold_0.ckpt": tmp_path / "fold_0.ckpt", "fold_1.ckpt": tmp_path / "fold_1.ckpt"}
    folds = training.run_info(tiny_params, prepared, Fitted([result, result], members, None))
    assert folds.model_sha256 == hashlib.sha256(b"firstsecond").hexdigest()
    # A run.json from before (it named the MLflow run): still read, e.g. as model.weights; no sha recorded.
    older = {k: v for k, v in info.as_dict().items() if k != "model_sha256"} | {"run_id": "r1"}
    assert RunInfo.from_dict(older).model_sha256 == ""


def test_a_full_disk_while_last_ckpt_is_written_leaves_the_previous_one(
    tiny_params, prepared, tmp_path, monkeypatch
):
    import errno
    import io
    import shutil

    from pipeline.config import with_overrides

    params = with_overrides(tiny_params, {"train.max_epochs": 1})
    out = tmp_path / "ckpt"
    fit(params, datamodule(params, prepared, None), out_dir=out)
    before = (out / "last.ckpt").read_bytes()
    real_save, real_move = torch.save, shutil.move

    def full(written: bytes, dest):  # half of it reached the disk, then the disk was full
        with open(dest, "wb") as f:
            f.write(written[: len(written) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f, *args, **kwargs):  # wherever the checkpoint's bytes go to a file named for last.ckpt
        if isinstance(f, io.BytesIO) or "last.ckpt" not in str(f):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        full(buffer.getvalue(), f)

    def move(src, dst, *args, **kwargs):  # Lightning stages in the temporary folder, then copies
        if "last.ckpt" not in str(dst):
            return real_move(src, dst, *args, **kwargs)
        full(Path(src).read_bytes(), dst)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "move", move)
    params = with_overrides(params, {"train.max_epochs": 2})
    with pytest.raises(OSError, match="No space left"):
        fit(params, datamodule(params, prepared, None), out_dir=out, resume_from=out / "last.ckpt")
    assert (out / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["best.ckpt", "last.ckpt"]  # no staging copy left


def test_an_unreadable_last_ckpt_is_reported_and_training_starts_over(
    tiny_params, prepared, tmp_path, caplog
):
    from pipeline.training.resume import Resume

    resume = Resume(tmp_path / ".models.resume", "k")
    fit(tiny_params, datamodule(tiny_params, prepared, None), out_dir=resume.checkpoints)
    last = resume.checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])  # a kill mid-write, by an older version
    result = fit(
        tiny_params,
        datamodule(tiny_params, prepared, None),
        out_dir=resume.checkpoints,
        resume_from=resume.last_checkpoint(),
    )
    assert result.epochs_run == tiny_params.train.max_epochs
    assert f"{last} cannot be read" in caplog.text and "starts over" in caplog.text
    assert resume.last_checkpoint() == last  # replaced by a whole one


def test_the_pretrain_record_names_no_mlflow_run_and_reads_older_ones(tmp_path):
    """pretrain.json is a DVC output (data/pretrain): no run id in it; a record from before, with one, still reads."""
    import dataclasses

    from pipeline.runinfo import PRETRAIN_RECORD, Pretrained

    record = Pretrained(method="simclr", arch="resnet18", in_channels=3, image_size=32, images=28, epochs=2)
    record.write(tmp_path)
    assert "run_id" not in json.loads((tmp_path / PRETRAIN_RECORD).read_text())
    older = dataclasses.asdict(record) | {"run_id": "0123abcd"}
    (tmp_path / PRETRAIN_RECORD).write_text(json.dumps(older))
    assert Pretrained.read(tmp_path) == record


def test_a_slimmed_checkpoint_is_the_same_bytes_wherever_it_was_staged(tmp_path):
    """The shipped checkpoint's bytes (models/ in dvc.lock, run.json's model_sha256) depend on its content only:
    torch.save names the archive's folder after a path it is given, and the staging file's name is random."""
    import hashlib

    from pipeline.training.callbacks import slim_checkpoint

    checkpoint = {"state_dict": {"w": torch.arange(6.0)}, "epoch": 3, "optimizer_states": [{"lr": 0.1}]}
    digests = set()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        torch.save(checkpoint, tmp_path / name / "best.ckpt")
        slim_checkpoint(tmp_path / name / "best.ckpt")
        digests.add(hashlib.sha256((tmp_path / name / "best.ckpt").read_bytes()).hexdigest())
        assert "optimizer_states" not in torch.load(tmp_path / name / "best.ckpt", weights_only=True)
    assert len(digests) == 1

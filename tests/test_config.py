import time
from pathlib import Path

import pytest

from pipeline import config

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_are_valid_and_complete():
    params = config.load(REPO / "params.yaml")
    assert params.model.arch == "resnet18"
    # params.yaml spells out every key, so dvc.yaml can list them and `dvc exp run -S` can set them.
    assert set(config.flatten(params)) == set(config.flatten(config.parse({})))


@pytest.mark.parametrize(
    "raw, key, words",
    [
        ({"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
        ({"bogus": 1}, "bogus", "unknown key"),
        ({"train": {"max_epochs": "ten"}}, "train.max_epochs", "integer"),
        ({"train": {"lr": -1}}, "train.lr", "greater than 0"),
        ({"model": {"arch": "vgg16"}}, "model.arch", "resnet50"),
        ({"data": {"val_fraction": 0.7}}, "data.val_fraction", "less than 0.5"),
        (
            {"tune": {"search_space": {"train.nope": {"type": "float", "low": 1, "high": 2}}}},
            "train.nope",
            "not a params key",
        ),
        (
            {"tune": {"search_space": {"train.lr": {"type": "float", "low": 2, "high": 1}}}},
            "tune.search_space.train.lr",
            "low",
        ),
        ({"evaluate": {"threshold": "sensitivity"}}, "evaluate", "sensitivity:<target>"),
        ({"evaluate": {"threshold": 1.5}}, "evaluate", "a number in (0, 1)"),
        ({"train": {"ema_decay": 1.0}}, "train.ema_decay", "less than 1"),
        ({"train": {"monitor": "val/acc"}}, "train.monitor", "now called 'val/accuracy'"),
    ],
)
def test_bad_values_name_the_key(raw, key, words):
    with pytest.raises(config.ConfigError) as err:
        config.parse(raw)
    assert key in str(err.value) and words in str(err.value)


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads "1e-3" as a string; it must still validate as the number the user meant.
    (tmp_path / "params.yaml").write_text("train:\n  lr: 1e-3\n")
    assert config.load(tmp_path / "params.yaml").train.lr == pytest.approx(1e-3)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [1, 2\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(tmp_path / "params.yaml")


def test_overrides_are_validated_and_leave_the_original_alone():
    params = config.parse({})
    tuned = config.with_overrides(params, {"train.lr": 0.02, "model.dropout": 0.2})
    assert (tuned.train.lr, tuned.model.dropout, params.train.lr) == (0.02, 0.2, 1e-3)
    with pytest.raises(config.ConfigError, match=r"train.lr"):
        config.with_overrides(params, {"train.lr": -1.0})
    with pytest.raises(ValueError, match=r"train.foo"):
        config.with_overrides(params, {"train.foo": 1})


def test_flatten_uses_params_yaml_names():
    flat = config.flatten(config.parse({}))
    assert flat["train.lr"] == 1e-3 and flat["model.arch"] == "resnet18"
    assert flat["tune.search_space.train.lr.log"] is True
    assert flat["augment.transforms"].startswith("[{")


@pytest.mark.parametrize(
    "key,uri",
    [
        ("tune.storage", "postgresql://optuna:hunter2@127.0.0.1:5432/optuna"),
        ("mlflow.tracking_uri", "http://me:hunter2@127.0.0.1:5000"),
        ("mlflow.tracking_uri", "https://127.0.0.1/?token=hunter2"),
        ("model.weights", "https://me:hunter2@example.org/w.pth"),
        ("model.weights", "runs:/0123abcd/model?token=hunter2"),
    ],
)
def test_a_credential_in_a_params_uri_is_refused_without_echoing_it(tmp_path, key, uri):
    section, name = key.split(".")
    (tmp_path / "params.yaml").write_text(f"{section}:\n  {name}: '{uri}'\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(tmp_path / "params.yaml")
    assert key in str(err.value) and "environment" in str(err.value) and "hunter2" not in str(err.value)


def test_an_empty_params_file_is_refused(tmp_path):
    for text in ("", "# all commented out\n", "---\n"):
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(config.ConfigError, match=r"params.yaml: is empty"):
            config.load(tmp_path / "params.yaml")


def test_regularizers_and_decisions_are_keys_the_tuner_can_search():
    params = config.parse(
        {
            "tune": {
                "search_space": {
                    "augment.mixup_alpha": {"type": "float", "low": 0.0, "high": 0.4},
                    "augment.cutmix_alpha": {"type": "categorical", "choices": [0.0, 1.0]},
                    "train.ema_decay": {"type": "categorical", "choices": [None, 0.99]},
                }
            }
        }
    )
    tuned = config.with_overrides(params, {"augment.mixup_alpha": 0.2, "train.ema_decay": 0.99})
    assert (tuned.augment.mixup_alpha, tuned.train.ema_decay) == (0.2, 0.99)
    assert config.parse_threshold("specificity:0.9") == ("specificity", 0.9)
    assert config.parse_threshold(0.3) == config.parse_threshold("0.3") == ("fixed", 0.3)
    assert config.parse_threshold("youden") == ("youden", None)


def test_every_monitor_declares_which_way_is_better():
    from typing import get_args, get_type_hints

    from pipeline import vocabulary

    monitors = get_args(get_type_hints(config.Train)["monitor"])
    assert {m: vocabulary.better(m) for m in monitors} == {
        "val/loss": "min",
        "val/accuracy": "max",
        "val/balanced_accuracy": "max",
        "val/auroc": "max",
    }


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    # Nine levels of ten aliases each: a billion values once expanded; PyYAML builds it as shared references
    # in no time, but validating (or dumping to MLflow) walks every one of them.
    lines = ['a0: &a0 ["x"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\ntrain:\n  lr: 0.01\n")
    started = time.monotonic()
    with pytest.raises(config.ConfigError, match=r"params.yaml: not valid YAML: .*alias"):
        config.load(tmp_path / "params.yaml")
    assert time.monotonic() - started < 5
    # A recursive alias is unbounded too; a few ordinary aliases still load.
    (tmp_path / "params.yaml").write_text("data: &d\n  exclude: *d\n")
    with pytest.raises(config.ConfigError, match="alias"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("x: &lr 0.02\ntrain:\n  lr: *lr\n  max_epochs: 3\n")
    with pytest.raises(config.ConfigError, match="x: unknown key"):  # loaded, then validated as usual
        config.load(tmp_path / "params.yaml")


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\n  max_epochs: 3\n  lr: 0.2\n")
    with pytest.raises(config.ConfigError, match=r"duplicate key 'lr' \(line 4; first on line 2\)"):
        config.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.1\ntrain:\n  max_epochs: 3\n")
    with pytest.raises(config.ConfigError, match=r"duplicate key 'train' \(line 3"):
        config.load(tmp_path / "params.yaml")

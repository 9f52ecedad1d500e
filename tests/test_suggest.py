"""suggest on a real (tiny) labelled set and pool: the region nobody labelled first, no near duplicates in a
batch, uncertainty from the shipped model's draws, a sheet, and MLflow rounds told apart by the label count."""

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline import augment, config, tracking
from pipeline.active import suggest as work
from pipeline.data.ingest import ingest
from pipeline.data.pool import prepare_pool
from pipeline.data.pooled import load_pool
from pipeline.training.model import Classifier
from tests.conftest import write_class_folders

DATA = config.Data(image_size=16, val_fraction=0.25, test_fraction=0.25, near_duplicate_bits=10)


def write_pool(root: Path, seed: int = 3) -> Path:
    """12 images like each labelled class (one dominant channel) and 12 of a kind no label has: grey stripes."""
    rng = np.random.default_rng(seed)
    for k in range(3):
        for i in range(12):
            img = rng.integers(0, 90, (16, 16, 3))
            img[..., k] += 120
            Image.fromarray(img.astype(np.uint8)).save(_file(root / f"like{k}" / f"{i}.png"))
    for i in range(12):
        img = np.zeros((16, 16, 3), np.uint8)
        img[::2] = 200 + rng.integers(0, 40, (8, 16, 3))
        img[1::2] = rng.integers(0, 40, (8, 16, 3))
        Image.fromarray(img).save(_file(root / "stripes" / f"{i}.png"))
    for i in range(4):  # near copies of one like0 image: one grey level off in one pixel
        img = np.asarray(Image.open(root / "like0" / "0.png")).copy()
        img[i, i, 0] ^= 1
        Image.fromarray(img).save(_file(root / "copies" / f"{i}.png"))
    return root


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def project(tmp_path) -> tuple[config.Params, Path]:
    src = write_class_folders(tmp_path / "labelled", per_class=8, size=16)
    ingest(src, tmp_path / "prepared", seed=0, data=DATA)
    pool_src = write_pool(tmp_path / "unlabelled")
    pd.DataFrame({"path": sorted(str(p.relative_to(pool_src)) for p in pool_src.rglob("*.png"))}).to_csv(
        pool_src / "manifest.csv", index=False
    )
    prepare_pool(pool_src, tmp_path / "pool", data=DATA, labelled=tmp_path / "prepared")
    augment.save(augment.build([], seed=0, preset="none"), tmp_path / "t.json")
    params = config.parse(
        {
            "data": dataclasses.asdict(DATA) | {"unlabelled": "unlabelled"},
            "model": {"weights": "none"},
            "evaluate": {"tta": ["HorizontalFlip", "VerticalFlip"], "batch_size": 16},
            "paths": {
                "prepared": str(tmp_path / "prepared"),
                "pool": str(tmp_path / "pool"),
                "augment_pipeline": str(tmp_path / "t.json"),
                "model_dir": str(tmp_path / "models"),
            },
        }
    )
    return params, tmp_path


def stripes(pool, rows) -> list[bool]:
    return [Path(p).parent.name == "stripes" for p in pool.kept()["path"].to_numpy()[rows]]


def pretrained_weights(params: config.Params, root: Path) -> config.Params:
    """``model.weights`` a state_dict file (a random ResNet-18's: what counts is that weights load)."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), root / "backbone.pth")
    return config.with_overrides(params, {"model.weights": str(root / "backbone.pth")})


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_a_cold_start_picks_the_region_nobody_labelled_first(project, seed):
    params, root = project
    params = pretrained_weights(dataclasses.replace(params, seed=seed), root)
    pool = load_pool(root / "pool")
    suggestion, picks = work.suggest(params, 4, "auto", None, pool=pool)
    again, _ = work.suggest(params, 4, "auto", None, pool=pool)
    assert again.table.equals(suggestion.table)  # a cold start is reproducible
    assert suggestion.strategy == "typical" and suggestion.draws == 0
    assert stripes(pool, picks[:1]) == [True]
    assert (suggestion.table["predicted"] == "").all()  # no trained model: no prediction to show
    assert list(suggestion.table.columns) == list(work.COLUMNS)
    assert suggestion.table["rank"].tolist() == [1, 2, 3, 4]


def test_typicality_clusters_the_pretrained_weights_features_not_the_fine_tuned_model_s(project):
    """TypiClust clusters frozen features: a model fine-tuned on a few labels (here one with other weights)
    does not change what typicality ranks when the weights it started from are pretrained."""
    params, root = project
    params = pretrained_weights(params, root)
    pool = load_pool(root / "pool")
    cold, _ = work.suggest(params, 4, "typical", None, pool=pool)
    small = config.Model(arch="resnet18", stem="small", weights="none")
    torch.manual_seed(7)
    tuned = Classifier(small, num_classes=3, class_names=["alpha", "beta", "gamma"]).eval()
    warm, picks = work.suggest(params, 4, "typical", [tuned], pool=pool, pretrained=True)
    assert warm.table["path"].tolist() == cold.table["path"].tolist()
    assert stripes(pool, picks[:1]) == [True]
    assert warm.table["predicted"].isin(["alpha", "beta", "gamma"]).all()  # the model still says what it sees


def test_a_cold_start_on_a_random_init_is_random(project):
    """Typicality on a random init's features lost to random on both measured sets (issue 27); the batch is
    kept diverse all the same (the next test)."""
    params, root = project
    suggestion, _ = work.suggest(params, 4, "auto", None, pool=load_pool(root / "pool"))
    assert suggestion.strategy == "random"


def test_no_two_picks_are_near_duplicates(project):
    params, root = project
    pool = load_pool(root / "pool")
    sets = work.duplicate_sets(pool, params.data.near_duplicate_bits)
    for strategy in ("typical", "random"):
        _, picks = work.suggest(params, len(pool), strategy, None, pool=pool)
        assert len(set(sets[picks])) == len(picks)  # one image per near-duplicate set
    copies = [Path(p).parent.name == "copies" or p.endswith("like0/0.png") for p in pool.kept()["path"]]
    assert len(set(sets[copies])) == 1 and len(np.unique(sets)) == len(pool) - 4  # the copies: one set


def test_uncertainty_comes_from_the_shipped_model_s_views(project):
    params, _ = project
    small = config.Model(arch="resnet18", stem="small", weights="none")
    model = Classifier(small, num_classes=3, class_names=["alpha", "beta", "gamma"]).eval()
    suggestion, picks = work.suggest(params, 5, "bald", [model])
    assert suggestion.draws == 3  # the image and its two TTA views
    assert len(picks) == 5 and suggestion.table["predicted"].isin(["alpha", "beta", "gamma"]).all()
    assert suggestion.table["probability"].between(0, 1).all()
    scores = suggestion.table["score"].to_numpy()
    assert np.all(np.diff(scores) <= 1e-12) or "bald" in suggestion.table["why"].iloc[0]
    with pytest.raises(work.SuggestError, match="needs a trained model"):
        work.suggest(params, 5, "margin", None)


def test_the_sheet_and_csv_are_written_and_rounds_follow_the_label_count(project, monkeypatch):
    params, root = project
    monkeypatch.chdir(root)
    tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{root}/mlflow.db", experiment="al"))
    pool = load_pool(root / "pool")
    suggestion, picks = work.suggest(params, 4, "typical", None, pool=pool)
    csv, sheet = root / "reports" / "suggest.csv", root / "reports" / "suggest.png"
    work.write(suggestion, pool, picks, csv, sheet)
    assert pd.read_csv(csv)["path"].tolist() == suggestion.table["path"].tolist()
    assert Image.open(sheet).size[0] > 100
    assert work.record(suggestion, params, "tiny", csv, sheet) == 1
    assert work.record(suggestion, params, "tiny", csv, sheet) == 1  # asked again in the same round
    more = dataclasses.replace(suggestion, labels=suggestion.labels + 4)
    assert work.record(more, params, "tiny", csv, sheet) == 2
    runs = mlflow.search_runs(filter_string="tags.stage = 'suggest'", output_format="list")
    assert {r.data.tags["al.round"] for r in runs} == {"1", "2"}
    assert {r.data.metrics["al/labels"] for r in runs} == {suggestion.labels, suggestion.labels + 4}
    assert any(a.path == "suggest.csv" for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id))
    added = dataclasses.replace(suggestion, round=3)  # after intake --add: the set's own round (rounds.json)
    assert work.record(added, params, "tiny", csv, sheet) == 3
    latest = mlflow.search_runs(filter_string="tags.`al.round` = '3'", output_format="list")
    assert len(latest) == 1 and latest[0].data.tags["active/round"] == "3"

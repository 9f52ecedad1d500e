"""Which images suggest picks: the unlabelled region first, uncertainty the right way round, a diverse batch."""

import numpy as np
import pytest

from pipeline.active import acquisition


def blobs(centres, per, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    return np.concatenate([c + spread * rng.standard_normal((per, len(c))) for c in centres])


CENTRES = np.eye(8)[:3] * 6  # three well-separated regions of feature space


@pytest.mark.parametrize("budget", [1, 3])
def test_a_region_nobody_labelled_is_picked_first_at_a_cold_start(budget):
    labelled = blobs(CENTRES[:2], 5, seed=0)  # regions 0 and 1 have labels, region 2 has none
    pool = blobs(CENTRES, 40, seed=1)
    ranked = acquisition.rank_typical(pool, labelled, budget, seed=0)
    first = ranked.order[0]
    assert 80 <= first < 120, "the first pick comes from the unlabelled region"
    assert "no label yet" in ranked.reasons[first]
    # and it is that region's most typical image: the one nearest its centre, nearly
    region = pool[80:120]
    assert np.linalg.norm(pool[first] - CENTRES[2]) <= np.quantile(
        np.linalg.norm(region - CENTRES[2], axis=1), 0.25
    )


def test_uncertain_images_come_first_for_margin_entropy_and_bald():
    sure, unsure = [0.95, 0.05], [0.5, 0.5]
    agree = np.array([[sure] * 4, [unsure] * 4]).transpose(0, 2, 1)  # (2 images, 2 classes, 4 draws)
    for strategy in ("margin", "entropy"):
        assert acquisition.rank_uncertain(strategy, agree).order[0] == 1
    # BALD: the draws of image 0 disagree (each sure, of a different class); image 1's agree on 50/50
    disagree = np.array([[[0.95, 0.05], [0.05, 0.95]] * 2, [unsure] * 4]).transpose(0, 2, 1)
    assert acquisition.rank_uncertain("bald", disagree).order[0] == 0
    with pytest.raises(ValueError, match="several draws"):
        acquisition.uncertainty("bald", disagree[:, :, :1])


def test_auto_is_typical_at_a_cold_start_then_uncertainty():
    assert acquisition.resolve("auto", None, draws=1) == "typical"
    assert acquisition.resolve("auto", [2, 12], draws=5) == "typical"  # 7 per class on average
    assert acquisition.resolve("auto", [2, 30], draws=5) == "bald"  # the average decides, not the least
    assert acquisition.resolve("auto", [12, 30], draws=5) == "bald"
    assert acquisition.resolve("auto", [12, 30], draws=1) == "margin"
    assert acquisition.resolve("random", None, draws=1) == "random"


def test_auto_starts_at_random_on_a_random_inits_features():
    """Typicality needs features that mean something: on a random init's it lost to random (issue 27)."""
    assert acquisition.resolve("auto", None, draws=1, pretrained=False) == "random"
    assert acquisition.resolve("auto", [2, 12], draws=5, pretrained=False) == "random"
    assert acquisition.resolve("auto", [12, 30], draws=5, pretrained=False) == "bald"
    assert acquisition.resolve("typical", None, draws=1, pretrained=False) == "typical"


def test_a_batch_takes_one_image_per_near_duplicate_set_or_patient_and_caps_each_cluster():
    features = blobs(CENTRES, 30, seed=2)
    n = len(features)
    scores = np.zeros(n)
    scores[:30] = 10 + np.arange(30)  # region 0 ranks first: an uncertainty ranking would take all of it
    ranked = acquisition.Ranked(np.argsort(-scores, kind="stable"), scores, [""] * n)
    sets = np.arange(n)
    sets[25:30] = 25  # five near duplicates of one image (the best ranked), one set
    sets[40:45] = 40  # one patient's five slices
    picks = acquisition.diverse(ranked, 12, sets, features, seed=0)
    assert len(picks) == len(set(picks)) == 12
    assert len({sets[i] for i in picks}) == 12  # no set twice
    per_region = np.bincount(np.asarray(picks) // 30, minlength=3)
    assert per_region[0] < 12 and per_region[1:].sum() > 0  # not the whole batch from region 0
    cluster = acquisition.clusters(features, 12, seed=0)  # the clusters diverse() capped: 2 x 12 / 12 each
    assert np.bincount(cluster[picks]).max() <= 2
    assert 29 in picks  # the best image is always taken


def test_random_is_a_permutation():
    ranked = acquisition.rank_random(10, seed=0)
    assert sorted(ranked.order.tolist()) == list(range(10))


def test_the_command_offers_every_strategy():
    from pipeline.stages import suggest

    assert suggest.STRATEGIES == acquisition.STRATEGIES

"""The audit's views: each transform applied on its own, the grey floor, and the pools drawn as in training."""

import albumentations as A
import numpy as np
import pytest

from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING
from datamodules.perturbations import (
    PerturbationPool,
    RandomPerspective,
    ViewMaker,
    information_preserving_pool,
    information_removing_pool,
)
from datamodules.pool_audit import GREY_LEVEL, AuditViewMaker, load_candidates, transform_config

IMAGE = np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8)


def test_views_of_one_example():
    maker = AuditViewMaker(
        information_preserving_pool(),
        information_removing_pool(),
        candidates={REMOVING: [A.ToGray(p=1.0)]},
    )
    names = [view.name for view in maker.views]
    assert names == [
        "preserving:0", "preserving:1", "preserving:2", "removing:0", "removing:1", "removing:candidate:0",
        "grey", "pool:preserving", "pool:removing",
    ]  # fmt: skip
    perspective = maker.views[1]
    assert perspective.label == "RandomPerspective" and perspective.probability == 0.5
    views = maker(IMAGE, seed=3, epoch=0, example_id="ex")
    assert (views["grey"] == GREY_LEVEL).all() and views[ORIGINAL] is not IMAGE
    gray = views["removing:candidate:0"]
    assert (gray[..., 0] == gray[..., 1]).all()
    # The pools as configured: exactly what training's ViewMaker draws for this example and epoch.
    training = ViewMaker((PRESERVING, REMOVING))(IMAGE, seed=3, epoch=0, example_id="ex")
    assert np.array_equal(views["pool:preserving"], training[PRESERVING])
    assert np.array_equal(views["pool:removing"], training[REMOVING])


def test_each_transform_is_applied_whatever_its_probability():
    # Perspective with p = 0 in the pool: never drawn in training, always applied in the audit, with the
    # parameters the pool's seed gives it.
    never = RandomPerspective(distortion_scale=0.2, p=0.0)
    maker = AuditViewMaker(PerturbationPool([never], view=PRESERVING), information_removing_pool())
    for example in ("a", "b", "c"):
        views = maker(IMAGE, seed=0, epoch=0, example_id=example)
        assert not np.array_equal(views["preserving:0"], IMAGE)
        assert np.array_equal(views["pool:preserving"], IMAGE)
        forced = PerturbationPool([RandomPerspective(distortion_scale=0.2, p=1.0)], view=PRESERVING)
        assert np.array_equal(views["preserving:0"], forced(IMAGE, seed=0, epoch=0, example_id=example))
    assert never.p == 0.0  # the pool's own transform is untouched


def test_transform_config_round_trips():
    spec = transform_config(A.CoarseDropout(num_holes_range=(4, 6), hole_height_range=(0.3, 0.5), p=1.0))
    assert spec["class_path"] == "albumentations.CoarseDropout"
    assert spec["init_args"]["num_holes_range"] == [4, 6]
    assert (
        transform_config(RandomPerspective(p=0.5))["class_path"]
        == "datamodules.perturbations.RandomPerspective"
    )


def test_candidates_file(tmp_path):
    path = tmp_path / "candidates.yaml"
    path.write_text(
        "preserving:\n  - {class_path: albumentations.GaussNoise, init_args: {std_range: [0.02, 0.05], p: 1.0}}\n"
        "removing:\n  - {class_path: albumentations.ToGray}\n"
    )
    candidates = load_candidates(path)
    assert [type(t).__name__ for t in candidates[PRESERVING]] == ["GaussNoise"]
    assert [type(t).__name__ for t in candidates[REMOVING]] == ["ToGray"]
    path.write_text("removing:\n  - {class_path: albumentations.CoarseDropout, init_args: {holes: 3}}\n")
    with pytest.raises(ValueError, match=r"removing\[0\] \(albumentations.CoarseDropout\)"):
        load_candidates(path)
    path.write_text("remove: []\n")
    with pytest.raises(ValueError, match="unknown keys \\['remove'\\]"):
        load_candidates(path)

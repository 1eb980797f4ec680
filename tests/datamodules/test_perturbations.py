"""Image views (algorithm doc section 3): size, determinism, and that each view does what its name says."""

import colorsys
import functools
import hashlib
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonargparse import ArgumentParser
from PIL import Image

from datamodules.perturbations import (
    MASKED,
    PERTURBED_VIEWS,
    PRESERVING,
    REMOVING,
    PerturbationPool,
    RandomPatchMasking,
    RandomPerspective,
    RandomZoomCrop,
    ViewMaker,
    derive_view_seeds,
    information_preserving_transforms,
    information_removing_transforms,
    make_views,
    papo_masking_pool,
    papo_masking_transforms,
)

REPO = Path(__file__).resolve().parents[2]


@functools.cache
def forced_single_transform_pools():
    """One pool per default transform, with p forced to 1 so that every call really transforms."""
    pools = []
    for view, factory in (
        (PRESERVING, information_preserving_transforms),
        (REMOVING, information_removing_transforms),
        (MASKED, papo_masking_transforms),
    ):
        for transform in factory():
            transform.p = 1.0
            pools.append(PerturbationPool([transform], view=view))
    return pools


def transform_named(pools, name):
    return next(pool for pool in pools if type(pool.transforms[0]).__name__ == name)


def noise_image(height, width, seed=0, low=0):
    return np.random.default_rng(seed).integers(low, 256, size=(height, width, 3), dtype=np.uint8)


def centroid(channel):
    weights = channel.astype(np.float64)
    ys, xs = np.indices(weights.shape)
    return np.array([(weights * xs).sum(), (weights * ys).sum()]) / weights.sum()


# ------------------------------------------------------------------------------------------------
# Size, dtype, input handling
# ------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    height=st.integers(16, 300),
    width=st.integers(16, 300),
    image_seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 1000),
    example_id=st.text(min_size=0, max_size=20),
)
def test_every_transform_keeps_size_and_dtype_and_leaves_the_input_alone(
    height, width, image_seed, epoch, example_id
):
    image = noise_image(height, width, image_seed)
    before = image.copy()
    for pool in forced_single_transform_pools():
        out = pool(image, seed=image_seed, epoch=epoch, example_id=example_id)
        assert out.shape == (height, width, 3), type(pool.transforms[0]).__name__
        assert out.dtype == np.uint8
    np.testing.assert_array_equal(image, before)


def test_default_pools_are_the_release_pools():
    jitter, perspective, rotate = PerturbationPool(view=PRESERVING).transforms
    assert isinstance(jitter, A.ColorJitter) and jitter.p == 1
    assert jitter.brightness == (0.2, 1.3)
    assert jitter.contrast == jitter.saturation == (0.2, 1.8)
    assert jitter.hue == (0.0, 0.0)
    assert isinstance(perspective, RandomPerspective) and perspective.p == 0.5
    assert perspective.distortion_scale == 0.2 and perspective.fill == 0
    assert isinstance(rotate, A.Rotate) and rotate.limit == (-10, 10) and rotate.p == 1
    assert not rotate.crop_border

    occlusion, zoom = PerturbationPool(view=REMOVING).transforms
    assert isinstance(occlusion, A.CoarseDropout) and occlusion.num_holes_range == (50, 50)
    assert occlusion.hole_height_range == occlusion.hole_width_range == (0.05, 0.15)
    assert occlusion.fill == "random" and occlusion.p == 1
    assert isinstance(zoom, RandomZoomCrop) and zoom.scale_range == (0.6, 0.7) and zoom.p == 1

    (mask,) = papo_masking_pool().transforms
    assert isinstance(mask, RandomPatchMasking)
    assert (mask.patch_size, mask.drop_prob, mask.fill) == (14, 0.6, 0)
    # PAPO masks the raw image; CPPO's views perturb the resized one, as in the release.
    assert papo_masking_pool().before_resize and PerturbationPool(view=MASKED).before_resize
    assert not PerturbationPool(view=PRESERVING).before_resize
    assert not PerturbationPool(view=REMOVING).before_resize


def test_grayscale_and_non_uint8_arrays_are_rejected_pil_images_are_converted():
    pool = PerturbationPool(view=REMOVING)
    grey, rgba, floats = np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8), np.zeros((32, 32, 3))
    for bad in (grey, rgba, floats):
        with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
            pool(bad, seed=0, epoch=0, example_id="a")
    gray = Image.fromarray(noise_image(40, 50)[..., 0], mode="L")
    out = pool(gray, seed=0, epoch=0, example_id="a")
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    # A PIL image and its RGB array give the same view.
    rgb = np.asarray(gray.convert("RGB"))
    np.testing.assert_array_equal(out, pool(rgb, seed=0, epoch=0, example_id="a"))


@pytest.mark.parametrize(
    "transform",
    [A.Resize(50, 50), A.RandomCrop(64, 64), A.Resize(50, 50, p=0.0), A.LongestMaxSize(max_size=64)],
    ids=["Resize", "RandomCrop", "Resize-p0", "LongestMaxSize"],
)
def test_a_transform_that_changes_the_size_is_rejected_at_construction(transform):
    # p=0 would never run in training, but the probe forces it: a pool must be size-safe as configured.
    with pytest.raises(ValueError, match=type(transform).__name__):
        PerturbationPool([A.ColorJitter(p=1.0), transform], view="custom")


def test_a_size_change_the_probe_cannot_see_is_caught_at_run_time():
    # Pads only images smaller than 64 px: the 97x131 probe passes, a 40x40 image does not.
    pool = PerturbationPool([A.PadIfNeeded(min_height=64, min_width=64, p=1.0)], view="custom")
    assert pool(noise_image(80, 90), seed=0, epoch=0, example_id="a").shape == (80, 90, 3)
    with pytest.raises(ValueError, match="PadIfNeeded changes the image size"):
        pool(noise_image(40, 40), seed=0, epoch=0, example_id="a")


def test_old_argument_names_are_rejected():
    # albumentations 2.0.8 only warns about `max_holes` and drops it; the pool's strict Compose refuses it.
    with pytest.warns(UserWarning, match="max_holes"):
        legacy = A.CoarseDropout(max_holes=8, p=1.0)
    with pytest.raises(ValueError, match="max_holes"):
        PerturbationPool([legacy], view=REMOVING)


def test_pool_copies_its_transforms():
    jitter = A.ColorJitter(p=1.0)
    pool_a = PerturbationPool([jitter], view="a")
    pool_b = PerturbationPool([jitter], view="b")
    assert pool_a.transforms[0] is not jitter and pool_b.transforms[0] is not pool_a.transforms[0]


# ------------------------------------------------------------------------------------------------
# YAML / jsonargparse
# ------------------------------------------------------------------------------------------------

POOL_YAML = """
pool:
  view: removing
  transforms:
    - class_path: albumentations.CoarseDropout
      init_args:
        num_holes_range: [50, 50]
        hole_height_range: [0.05, 0.15]
        hole_width_range: [0.05, 0.15]
        fill: random
        p: 1.0
    - class_path: datamodules.perturbations.RandomZoomCrop
      init_args:
        scale_range: [0.6, 0.7]
"""


def test_pool_from_yaml_with_class_arguments():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PerturbationPool, "pool")
    pool = parser.instantiate(parser.parse_string(POOL_YAML)).pool
    assert isinstance(pool, PerturbationPool) and pool.view == REMOVING
    occlusion, zoom = pool.transforms
    assert isinstance(occlusion, A.CoarseDropout) and occlusion.num_holes_range == (50, 50)
    assert occlusion.fill == "random"
    assert isinstance(zoom, RandomZoomCrop) and zoom.scale_range == (0.6, 0.7)
    assert pool(noise_image(60, 70), seed=1, epoch=2, example_id="x").shape == (60, 70, 3)


def test_pool_from_yaml_as_a_typed_argument():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--pool", type=PerturbationPool)
    config = parser.parse_string(
        """
        pool:
          class_path: datamodules.perturbations.PerturbationPool
          init_args:
            view: preserving
            transforms:
              - class_path: albumentations.Rotate
                init_args: {limit: [-10, 10], p: 1.0}
        """
    )
    pool = parser.instantiate(config).pool
    assert [type(t) for t in pool.transforms] == [A.Rotate] and pool.transforms[0].limit == (-10, 10)


@pytest.mark.parametrize(
    "old, new",
    [
        ("num_holes_range: [50, 50]", "max_holes: 50"),  # albumentations 1.x name
        ("scale_range: [0.6, 0.7]", "scale: [0.6, 0.7]"),  # the release's torchvision-style name
    ],
)
def test_yaml_with_unknown_argument_names_is_rejected(old, new):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PerturbationPool, "pool")
    key = new.split(":")[0]
    with pytest.raises(Exception, match=key):
        parser.parse_string(POOL_YAML.replace(old, new))


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_same_key_same_view_new_epoch_new_view():
    image = noise_image(64, 80, seed=3)
    for view in PERTURBED_VIEWS:
        first, second = PerturbationPool(view=view), PerturbationPool(view=view)
        changed = 0
        for i in range(20):
            key = dict(seed=7, epoch=0, example_id=f"ex-{i}")
            a = first(image, **key)
            np.testing.assert_array_equal(a, first(image, **key))  # same pool, called again
            np.testing.assert_array_equal(a, second(image, **key))  # a fresh pool
            changed += not np.array_equal(a, first(image, seed=7, epoch=1, example_id=f"ex-{i}"))
        # Two epochs can only agree if both draws are a no-op: perspective skipped (1/3 * 1/2) twice,
        # probability 1/36 per example for I+, 0 for the others. 20 examples: at least 16 change.
        assert changed >= 16, view


def test_seed_and_view_name_change_the_draw():
    a = derive_view_seeds(0, 0, "ex", PRESERVING)
    assert a == derive_view_seeds(0, 0, "ex", PRESERVING)
    assert (
        len(
            {
                a,
                derive_view_seeds(0, 0, "ex", REMOVING),
                derive_view_seeds(1, 0, "ex", PRESERVING),
                derive_view_seeds(0, 1, "ex", PRESERVING),
                derive_view_seeds(0, 0, "ex2", PRESERVING),
            }
        )
        == 5
    )
    # Keys are not confused by the separator: ("1", "23") and ("12", "3") are different examples.
    assert derive_view_seeds(1, 23, "x", "v") != derive_view_seeds(12, 3, "x", "v")


def test_transform_choice_is_uniform_and_independent_between_views():
    preserving, removing = PerturbationPool(view=PRESERVING), PerturbationPool(view=REMOVING)
    n = 3000
    counts = np.zeros((3, 2), dtype=int)
    for i in range(n):
        counts[preserving.choose(0, 0, f"id{i}"), removing.choose(0, 0, f"id{i}")] += 1
    # Independent uniform draws: each of the 6 cells ~ Binomial(3000, 1/6): mean 500, sd 20.4; 5 sd = 102.
    assert counts.min() >= 398 and counts.max() <= 602, counts


CHILD_SCRIPT = textwrap.dedent(
    """
    import hashlib
    import importlib.util
    import sys

    import numpy as np

    # Load the module file alone: the package __init__ imports the whole DataModule stack (slow to start).
    spec = importlib.util.spec_from_file_location("perturbations", "datamodules/perturbations.py")
    module = sys.modules["perturbations"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    maker = module.ViewMaker(views=("preserving", "removing", "masked"))
    image = np.random.default_rng(5).integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    digest = hashlib.sha256()
    for i in range(12):
        views = maker(image, seed=11, epoch=i % 3, example_id=f"synthetic-train-{i:06d}")
        for name in ("preserving", "removing", "masked"):
            digest.update(views[name].tobytes())
    print(digest.hexdigest())
    """
)


def test_views_are_identical_in_another_process():
    maker = ViewMaker(views=(PRESERVING, REMOVING, MASKED))
    image = np.random.default_rng(5).integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    digest = hashlib.sha256()
    for i in range(12):
        views = maker(image, seed=11, epoch=i % 3, example_id=f"synthetic-train-{i:06d}")
        for name in (PRESERVING, REMOVING, MASKED):
            digest.update(views[name].tobytes())
    # A fresh interpreter with a different string-hash salt: the draw must not depend on hash().
    env = dict(os.environ, PYTHONHASHSEED="12345", NO_ALBUMENTATIONS_UPDATE="1")
    child = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == digest.hexdigest()


def test_a_pickled_view_maker_draws_the_same_views():
    # DataLoader workers started with spawn receive the dataset (and its ViewMaker) pickled.
    maker = ViewMaker(views=(PRESERVING, REMOVING, MASKED))
    clone = pickle.loads(pickle.dumps(maker))
    image = noise_image(50, 50, seed=9)
    for i in range(6):
        a = maker(image, seed=0, epoch=1, example_id=str(i))
        b = clone(image, seed=0, epoch=1, example_id=str(i))
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


# ------------------------------------------------------------------------------------------------
# What the views do
# ------------------------------------------------------------------------------------------------


def test_occlusion_covers_the_expected_area_with_per_pixel_noise():
    pool = transform_named(forced_single_transform_pools(), "CoarseDropout")
    image = np.full((224, 224, 3), 128, dtype=np.uint8)
    fractions = []
    for i in range(40):
        out = pool(image, seed=0, epoch=0, example_id=str(i))
        changed = (out != 128).any(axis=-1)
        fractions.append(changed.mean())
        # Noise per pixel (the release), not one colour per hole (albumentations' "random_uniform"):
        # neighbours inside a hole are equal in all 3 channels with probability 256**-3.
        both = changed[:, :-1] & changed[:, 1:]
        left, right = out[:, :-1][both], out[:, 1:][both]
        assert (left == right).all(axis=-1).mean() < 0.01
    # A hole side is int(224 * U(0.05, 0.15)) ~ 21.9 px on average, so a hole covers ~(21.9/224)^2 = 0.0096
    # of the image. 50 holes placed independently leave a pixel uncovered with probability
    # ~(1 - 0.0096)^50 = 0.62, so the union covers ~0.38 (a little less: holes stay inside the image, so
    # borders are hit less). A draw varies by ~0.02 (sum of 50 hole areas, each sd ~0.004): 0.25-0.50 is
    # > 5 sd either way, and the mean of 40 draws (sd ~0.004) must land in 0.34-0.40.
    fractions = np.array(fractions)
    assert fractions.min() > 0.25 and fractions.max() < 0.50, fractions
    assert 0.34 < fractions.mean() < 0.40, fractions.mean()


def test_zoom_crop_keeps_60_to_70_percent_of_each_side():
    pool = transform_named(forced_single_transform_pools(), "RandomZoomCrop")
    # Each pixel stores its own coordinates: red = x, green = y.
    xs, ys = np.meshgrid(np.arange(256), np.arange(256))
    image = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    for i in range(40):
        out = pool(image, seed=0, epoch=0, example_id=str(i)).astype(int)
        # The window side is int(256 * f), f in [0.6, 0.7]: 153..179 px. Upscaling bilinearly keeps the
        # window's first and last coordinate, so each axis shows exactly that span (+-1 for rounding):
        # 30-40 % of each side, 51-64 % of the area, is gone.
        x_span = out[..., 0].max() - out[..., 0].min() + 1
        y_span = out[..., 1].max() - out[..., 1].min() + 1
        assert 152 <= x_span <= 180 and 152 <= y_span <= 180, (x_span, y_span)
        assert abs(x_span - y_span) <= 2  # one factor for both sides: the aspect ratio is kept
        # A zoom, not a shuffle: coordinates still increase to the right and downwards.
        assert (np.diff(out[..., 0], axis=1) >= 0).all() and (np.diff(out[..., 1], axis=0) >= 0).all()


def test_zoom_crop_moves_its_window_around():
    pool = transform_named(forced_single_transform_pools(), "RandomZoomCrop")
    xs, _ = np.meshgrid(np.arange(256), np.arange(256))
    image = np.repeat(xs[..., None], 3, axis=-1).astype(np.uint8)
    lefts = [pool(image, seed=0, epoch=0, example_id=str(i))[..., 0].min() for i in range(40)]
    # The window's left edge is uniform on [0, 256 - side] (77..103 px of room): it must spread.
    assert min(lefts) < 20 and max(lefts) > 60


def test_rotation_keeps_a_centred_shape_in_place():
    pool = transform_named(forced_single_transform_pools(), "Rotate")
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[82:142, 82:142] = 255  # centred square, centroid (111.5, 111.5)
    for i in range(20):
        out = pool(image, seed=0, epoch=0, example_id=str(i))
        assert np.abs(centroid(out[..., 0]) - 111.5).max() < 1.0
        # Rotation by at most 10 degrees keeps the square's area (nearest-neighbour: within a few %).
        assert abs((out[..., 0] > 0).sum() / 3600 - 1) < 0.05


def test_perspective_keeps_a_centred_shape_near_the_centre_without_drift():
    pool = transform_named(forced_single_transform_pools(), "RandomPerspective")
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    image[82:142, 82:142] = 255
    outs = [pool(image, seed=0, epoch=0, example_id=str(i)) for i in range(200)]
    shifts = np.array([centroid(out[..., 0]) - 111.5 for out in outs])
    distances = np.hypot(*shifts.T)
    # Corners move inwards by U{0..22} px (d * 112 = 22.4); the centre moves by a signed mix of the eight
    # offsets, a few px. By symmetry the mean shift is 0: 200 draws with a spread of a few px give a mean
    # within 3 px (> 4 sd). albumentations' Perspective(keep_size=True) without fit_output (its 2.0.8
    # double rescale) drifts towards the bottom-right by ~10 px on average and fails this.
    assert np.median(distances) < 0.05 * 224
    assert np.abs(shifts.mean(axis=0)).max() < 3.0, shifts.mean(axis=0)


def test_colour_jitter_keeps_edges_and_hue():
    pool = transform_named(forced_single_transform_pools(), "ColorJitter")
    image = np.full((64, 200, 3), 40, dtype=np.uint8)
    image[:, 100:] = 200  # vertical edge between columns 99 and 100
    for i in range(20):
        out = pool(image, seed=0, epoch=0, example_id=str(i)).astype(int)
        profile = out[..., 0].mean(axis=0)
        # Brightness >= 0.2 and contrast >= 0.2 leave a step of at least ~0.2 * 0.2 * 160 = 6 levels here.
        assert np.argmax(np.abs(np.diff(profile))) == 99
        # hue (0, 0) and grey input: saturation and brightness cannot create colour.
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_colour_jitter_does_not_rotate_hue():
    pool = transform_named(forced_single_transform_pools(), "ColorJitter")
    image = np.empty((8, 8, 3), dtype=np.uint8)
    image[:] = (170, 130, 90)  # hue (130 - 90) / (170 - 90) * 60 = 30 degrees
    checked = 0
    for i in range(60):
        pixel = pool(image, seed=0, epoch=0, example_id=str(i))[0, 0].astype(int)
        # Brightness scales and contrast/saturation blend with grey: all keep the hue exactly, up to rounding
        # to integers and clipping. Skip draws that clip or leave fewer than 24 levels between channels;
        # then +-1 level moves the hue by at most 60 * 2 / 24 = 5 degrees.
        if pixel.max() == 255 or pixel.min() == 0 or pixel.max() - pixel.min() < 24:
            continue
        checked += 1
        hue = colorsys.rgb_to_hsv(*(pixel / 255.0))[0] * 360
        assert abs(hue - 30) <= 5.0, (pixel, hue)
    assert checked >= 30


# ------------------------------------------------------------------------------------------------
# PAPO's masked view
# ------------------------------------------------------------------------------------------------


def cell_states(original, masked, patch):
    """Per cell: True if blackened whole, False if untouched; fails on a partly blackened cell."""
    height, width = original.shape[:2]
    states = []
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            cell = masked[top : top + patch, left : left + patch]
            if (cell == 0).all():
                states.append(True)
            else:
                np.testing.assert_array_equal(cell, original[top : top + patch, left : left + patch])
                states.append(False)
    return np.array(states)


def test_papo_mask_blackens_whole_cells_with_probability_0_6():
    pool = papo_masking_pool()
    image = noise_image(560, 560, seed=1, low=1)  # no zero pixel: black means masked
    fractions = []
    for i in range(5):
        states = cell_states(image, pool(image, seed=0, epoch=0, example_id=str(i)), 14)
        assert states.size == 1600  # 40 x 40 cells
        fractions.append(states.mean())
    # Binomial(1600, 0.6) / 1600 has sd sqrt(0.24 / 1600) = 0.0122; 5 sd = 0.061 per draw.
    assert all(0.539 < f < 0.661 for f in fractions), fractions
    # 5 draws together: sd 0.0055, 5 sd = 0.027.
    assert 0.573 < np.mean(fractions) < 0.627


def test_papo_mask_treats_partial_edge_cells_as_cells():
    pool = papo_masking_pool()
    image = noise_image(100, 130, seed=2, low=1)  # 100 = 7 * 14 + 2, 130 = 9 * 14 + 4
    states = np.concatenate(
        [cell_states(image, pool(image, seed=0, epoch=0, example_id=str(i)), 14) for i in range(10)]
    )
    assert states.size == 10 * 8 * 10
    assert 0.45 < states.mean() < 0.75


def test_patch_masking_parameters():
    image = noise_image(56, 56, low=1)
    never = PerturbationPool([RandomPatchMasking(patch_size=7, drop_prob=0.0)], view="m")
    always = PerturbationPool([RandomPatchMasking(patch_size=7, drop_prob=1.0, fill=9)], view="m")
    np.testing.assert_array_equal(never(image, seed=0, epoch=0, example_id="a"), image)
    assert (always(image, seed=0, epoch=0, example_id="a") == 9).all()
    with pytest.raises(ValueError):
        RandomPatchMasking(drop_prob=1.5)


# ------------------------------------------------------------------------------------------------
# ViewMaker
# ------------------------------------------------------------------------------------------------


def test_view_maker_returns_the_requested_views():
    image = noise_image(33, 47)
    cppo = ViewMaker()
    views = cppo(image, seed=0, epoch=0, example_id="a")
    assert set(views) == {"original", PRESERVING, REMOVING}
    np.testing.assert_array_equal(views["original"], image)
    assert all(v.shape == image.shape and v.dtype == np.uint8 for v in views.values())
    # The same draws as the pools on their own, and as the one-off helper.
    np.testing.assert_array_equal(
        views[REMOVING], PerturbationPool(view=REMOVING)(image, seed=0, epoch=0, example_id="a")
    )
    helper = make_views(image, seed=0, epoch=0, example_id="a")
    for name in views:
        np.testing.assert_array_equal(views[name], helper[name])
    assert set(ViewMaker(views=[MASKED])(image, seed=0, epoch=0, example_id="a")) == {"original", MASKED}
    assert set(ViewMaker(views=[])(image, seed=0, epoch=0, example_id="a")) == {"original"}


def test_view_maker_rejects_unknown_views():
    with pytest.raises(ValueError, match="unknown views"):
        ViewMaker(views=["blurred"])


def test_view_maker_draws_each_slot_under_its_own_name():
    # One masking pool (view name "preserving", the default) given for two slots: the two views must still
    # be drawn independently, because the slot name seeds the draw.
    shared = PerturbationPool([RandomPatchMasking(drop_prob=0.5)])
    maker = ViewMaker(views=(PRESERVING, REMOVING), preserving=shared, removing=shared)
    assert maker.pools[PRESERVING] is shared and maker.pools[REMOVING].view == REMOVING
    assert shared.view == PRESERVING  # the caller's pool is not renamed
    image = noise_image(56, 56, low=1)
    views = maker(image, seed=0, epoch=0, example_id="a")
    assert not np.array_equal(views[PRESERVING], views[REMOVING])

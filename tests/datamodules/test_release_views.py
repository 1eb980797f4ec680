"""The views the release draws, measured against the release's parameters.

- ``I+`` perspective: torchvision's ``RandomPerspective(distortion_scale=0.2, p=0.5)`` on PIL images.
  The reference below re-implements torchvision's sampling (``get_params``) and coefficient solve
  (``_get_perspective_coeffs``) in numpy and uses PIL's own perspective warp, independently of the
  package's albumentations/OpenCV transform.
- PAPO's mask: 14 px cells of the raw image blackened with p = 0.6, then the resize (``papo_utils.py``
  ``random_patch_blackening`` before the processor's resize).
"""

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from datamodules.examples import ImageLimits, fit_pixels
from datamodules.perturbations import (
    MASKED,
    PRESERVING,
    PerturbationPool,
    RandomPerspective,
    ViewMaker,
    information_preserving_transforms,
    papo_masking_pool,
)

HEIGHT, WIDTH = 96, 128  # not square: a swapped width/height shows
MAX_DX, MAX_DY = int(0.2 * (WIDTH // 2)), int(0.2 * (HEIGHT // 2))  # 12 and 9 px


def torchvision_endpoints(rng, width, height, distortion_scale):
    """torchvision's RandomPerspective.get_params: torch.randint(0, int(d * half) + 1) per coordinate."""
    dx, dy = int(distortion_scale * (width // 2)), int(distortion_scale * (height // 2))

    def offset(limit):
        return int(rng.integers(0, limit + 1))

    return [
        [offset(dx), offset(dy)],
        [width - 1 - offset(dx), offset(dy)],
        [width - 1 - offset(dx), height - 1 - offset(dy)],
        [offset(dx), height - 1 - offset(dy)],
    ]


def torchvision_coefficients(startpoints, endpoints):
    """torchvision's _get_perspective_coeffs: the output -> input homography, as PIL takes it."""
    a = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(endpoints, startpoints)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    return np.linalg.solve(a, np.array(startpoints, dtype=np.float64).reshape(8))


def corners(width, height):
    return [[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]]


def reference_black_fraction(endpoints, width, height):
    """Uncovered fraction of the canvas: 1 - area of the image of the source rectangle / canvas area.

    PIL fills an output pixel whose source point (homography of its centre) lies outside [0, W) x [0, H);
    so the covered region is the forward image of that rectangle, a quadrilateral (shoelace area).
    """
    coefficients = np.append(torchvision_coefficients(corners(width, height), endpoints), 1.0)
    forward = np.linalg.inv(coefficients.reshape(3, 3))
    quad = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64)
    mapped = quad @ forward.T
    xs, ys = mapped[:, 0] / mapped[:, 2], mapped[:, 1] / mapped[:, 2]
    area = 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
    return 1 - area / (width * height)


def test_corner_offsets_are_drawn_like_torchvision():
    transform = RandomPerspective(distortion_scale=0.2)
    transform.set_random_seed(0)
    draws = 2000
    offsets = []
    for _ in range(draws):
        points = transform.get_params_dependent_on_data({"shape": (HEIGHT, WIDTH, 3)}, {})["endpoints"]
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points.astype(int).tolist()
        offsets.append([x0, WIDTH - 1 - x1, WIDTH - 1 - x2, x3, y0, y1, HEIGHT - 1 - y2, HEIGHT - 1 - y3])
    offsets = np.array(offsets)
    for column in range(8):
        limit = MAX_DX if column < 4 else MAX_DY
        values = offsets[:, column]
        # Every offset is an integer in 0 .. limit (inwards only), each value equally likely:
        # chi-square against uniform, p > 0.001.
        assert values.min() == 0 and values.max() == limit
        counts = np.bincount(values, minlength=limit + 1)
        expected = draws / (limit + 1)
        chi_square = ((counts - expected) ** 2 / expected).sum()
        assert chi_square < stats.chi2.ppf(0.999, limit), (column, counts)
    # The eight coordinates are independent: correlations within sampling error (|r| < 4 / sqrt(n)).
    correlation = np.corrcoef(offsets.T)
    assert np.abs(correlation[np.triu_indices(8, 1)]).max() < 4 / np.sqrt(draws)


@pytest.mark.parametrize("seed", range(12))
def test_the_warp_is_pils_perspective_as_torchvision_calls_it(seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(20, 200)), int(rng.integers(20, 200))
    image = rng.integers(1, 256, (height, width, 3), dtype=np.uint8)  # no black pixel: black = uncovered
    distortion = [0.2, 0.5, 0.9][seed % 3]
    endpoints = torchvision_endpoints(rng, width, height, distortion)
    # torchvision rounds the coefficients to float32 before PIL warps with them.
    coefficients = torchvision_coefficients(corners(width, height), endpoints).astype(np.float32)
    expected = np.asarray(
        Image.fromarray(image).transform(
            (width, height), Image.Transform.PERSPECTIVE, coefficients.tolist(), Image.Resampling.BILINEAR
        )
    )
    ours = RandomPerspective(distortion_scale=distortion).apply(image, endpoints=np.array(endpoints, float))
    assert ours.shape == image.shape and ours.dtype == np.uint8
    # The same pixels are uncovered, and the others differ by the rounding of the interpolation only.
    np.testing.assert_array_equal((ours == 0).all(-1), (expected == 0).all(-1))
    assert np.abs(ours.astype(int) - expected.astype(int)).max() <= 1


def test_the_perspective_view_matches_the_release_black_area_and_rate():
    """The shipped I+ perspective, drawn through a pool as training draws it, on a white image."""
    (perspective,) = [t for t in information_preserving_transforms() if isinstance(t, RandomPerspective)]
    pool = PerturbationPool([perspective], view=PRESERVING)
    white = np.full((HEIGHT, WIDTH, 3), 255, dtype=np.uint8)
    draws = 600
    black = np.array(
        [(pool(white, seed=0, epoch=0, example_id=f"q{i}") == 0).all(-1).mean() for i in range(draws)]
    )
    applied = black > 0
    # p = 0.5: Binomial(600, 0.5) has sd 12.2; 4 sd = 49. (A draw with all eight offsets 0, which leaves
    # no black pixel, has probability 13^-4 * 10^-4.)
    assert abs(applied.sum() - draws / 2) < 49

    rng = np.random.default_rng(1)
    reference = np.array(
        [
            reference_black_fraction(torchvision_endpoints(rng, WIDTH, HEIGHT, 0.2), WIDTH, HEIGHT)
            for _ in range(20000)
        ]
    )
    measured = black[applied]
    # Mean: within 4 standard errors of the measured draws (the 20,000 reference draws add 1/6 of it),
    # plus 0.001 for counting pixel centres instead of area.
    standard_error = reference.std() * np.sqrt(1 / len(measured) + 1 / len(reference))
    assert abs(measured.mean() - reference.mean()) < 4 * standard_error + 0.001, (
        measured.mean(),
        reference.mean(),
    )
    # The whole distribution: two-sample Kolmogorov-Smirnov statistic below its 0.001 critical value.
    # (albumentations' Perspective(scale=0.0627, fit_output=True), the package's earlier I+, gave 0.81.)
    n, m = len(measured), len(reference)
    grid = np.sort(np.concatenate([measured, reference]))
    ks = np.abs(
        np.searchsorted(np.sort(measured), grid, side="right") / n
        - np.searchsorted(np.sort(reference), grid, side="right") / m
    ).max()
    assert ks < 1.95 * np.sqrt((n + m) / (n * m)), ks
    # For this size: mean uncovered fraction about 0.18 (corners move 6 and 4.5 px inwards on average).
    assert 0.15 < reference.mean() < 0.21


# ------------------------------------------------------------------------------------------------
# PAPO's mask: on the raw image, then the resize
# ------------------------------------------------------------------------------------------------

RAW = 448  # 32 x 32 cells of 14 px; resized by 1/2 into 224 x 224 (max_pixels 50176): 7 px cells
LIMITS = ImageLimits(max_pixels=224 * 224, factor=28)


def resize(array):
    return np.asarray(fit_pixels(Image.fromarray(array), LIMITS))


def cell_centres(view, cell=7):
    """The value at the centre of every cell of ``cell`` px: far enough from the edges of the cell that
    the bicubic downscale (2 output px of support) does not reach it."""
    centre = cell // 2
    return view[centre::cell, centre::cell, 0]


def test_papo_masks_the_raw_image_then_resizes_it():
    white = np.full((RAW, RAW, 3), 255, dtype=np.uint8)
    maker = ViewMaker(views=[MASKED])
    assert maker.needs_raw_image
    draws, kept = 20, []
    for i in range(draws):
        views = maker(resize(white), seed=0, epoch=0, example_id=f"q{i}", raw=white, resize=resize)
        masked = views[MASKED]
        assert masked.shape == views["original"].shape == (224, 224, 3)
        centres = cell_centres(masked)
        assert centres.shape == (32, 32) and set(np.unique(centres)) <= {0, 255}
        # Cells are 7 px in the view: every pixel of a cell's 3 x 3 core has the centre's value. Masking
        # after the resize would give 14 px cells, i.e. pairs of equal 7 px cells.
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                np.testing.assert_array_equal(masked[3 + dy :: 7, 3 + dx :: 7, 0], centres)
        kept.append((centres == 255).mean())
    # Each of the 1,024 cells is kept with p = 0.4: Binomial(1024, 0.4) / 1024 has sd 0.0153; over 20
    # draws the mean has sd 0.0034: within 4 sd of 0.4.
    assert abs(np.mean(kept) - 0.4) < 4 * np.sqrt(0.24 / 1024 / draws)
    # Horizontal neighbours pair up no more often than independent cells would (14 px cells would
    # always pair: columns 2j and 2j + 1 equal).
    pairs = [
        (
            cell_centres(
                maker(resize(white), seed=0, epoch=0, example_id=f"q{i}", raw=white, resize=resize)[MASKED]
            )
        )
        for i in range(3)
    ]
    same = np.mean([(c[:, 0::2] == c[:, 1::2]).mean() for c in pairs])
    assert same < 0.6  # independent cells: 0.4^2 + 0.6^2 = 0.52


def test_masking_after_the_resize_remains_available():
    white = np.full((RAW, RAW, 3), 255, dtype=np.uint8)
    after = ViewMaker(views=[MASKED], masked=papo_masking_pool(before_resize=False))
    assert not after.needs_raw_image
    masked = after(resize(white), seed=0, epoch=0, example_id="q", raw=white, resize=resize)[MASKED]
    # 14 px cells of the 224 px view: 16 x 16 cells, exact (no resampling after the mask).
    blocks = masked[:, :, 0].reshape(16, 14, 16, 14)
    assert ((blocks == blocks[:, :1, :, :1]).all()) and set(np.unique(masked)) == {0, 255}


def test_a_raw_view_that_resizes_to_another_size_is_refused():
    white = np.full((RAW, RAW, 3), 255, dtype=np.uint8)
    maker = ViewMaker(views=[MASKED])
    with pytest.raises(ValueError, match="resizes to"):
        maker(resize(white), seed=0, epoch=0, example_id="q", raw=white, resize=lambda array: array)
    with pytest.raises(ValueError, match="needs the resize"):
        maker(resize(white), seed=0, epoch=0, example_id="q", raw=white)

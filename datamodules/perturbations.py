"""Image views for CPPO and PAPO: information-preserving ``I+``, information-removing ``I-`` and PAPO's
patch-masked view (algorithm doc, section 3).

Every view is produced by a :class:`PerturbationPool`: a list of albumentations transforms of which one is
drawn uniformly per example and applied with its own probability ``p``. The draw is a pure function of
``(seed, epoch, example_id, view)``, so the same prompt gets the same views in every process and DataLoader
worker, and new views every epoch. Every transform must keep the image size (the three views of a prompt
must produce identical ``input_ids``): this is checked when a pool is built and again on every call.

Images are ``uint8`` RGB arrays of shape ``[H, W, 3]``. PIL images of any mode are converted to RGB;
numpy arrays of another shape or dtype (grayscale ``[H, W]``, RGBA, float) are rejected with a
``ValueError`` rather than silently converted, because the VLM processors downstream expect RGB.

Defaults follow the authors' release (``vbdi/cppo``, ``recipe/cppo/cppo_dataset.py``), which uses
torchvision; where albumentations has no exact equivalent the transform is written here as an
albumentations transform (:class:`RandomPerspective`, :class:`RandomZoomCrop`, :class:`RandomPatchMasking`).
CPPO's views perturb the image after its resize into the pixel limits, as the release does; PAPO's masked
view perturbs the raw image before the resize, as PAPO does (``PerturbationPool.before_resize``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.geometric import functional as fgeometric
from albumentations.core.transforms_interface import BaseTransformInitSchema
from albumentations.core.type_definitions import Targets
from PIL import Image
from pydantic import Field, field_validator

from cppo_lightning.batch import MASKED, PERTURBED_VIEWS, PRESERVING, REMOVING

__all__ = [
    "MASKED",
    "PRESERVING",
    "REMOVING",
    "PERTURBED_VIEWS",
    "PerturbationPool",
    "RandomPatchMasking",
    "RandomPerspective",
    "RandomZoomCrop",
    "ViewMaker",
    "derive_view_seeds",
    "draw_view",
    "information_preserving_pool",
    "information_preserving_transforms",
    "information_removing_pool",
    "information_removing_transforms",
    "make_views",
    "papo_masking_pool",
    "papo_masking_transforms",
    "to_rgb_array",
]


def __getattr__(name: str):
    # VIEW_NAMES named two different sets (here without the original, in cppo_lightning.batch with it).
    if name == "VIEW_NAMES":
        import warnings

        warnings.warn(
            "datamodules.perturbations.VIEW_NAMES is now PERTURBED_VIEWS (cppo_lightning.batch.VIEW_NAMES "
            "includes the original view)",
            DeprecationWarning,
            stacklevel=2,
        )
        return PERTURBED_VIEWS
    raise AttributeError(f"module 'datamodules.perturbations' has no attribute {name!r}")


ViewName = Literal["preserving", "removing", "masked"]

# Odd, non-square and not a multiple of 14, so that off-by-one size bugs and square-only assumptions show.
_PROBE_SHAPE = (97, 131, 3)
_PROBE_SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------------------------------------
# Custom transforms (no exact albumentations equivalent)
# --------------------------------------------------------------------------------------------------------


class RandomZoomCrop(A.DualTransform):
    """Crop a window keeping a random fraction of each side at a random place, resize it back to full size.

    The release's ``RandomZoomCrop(scale=(0.6, 0.7))``: one factor ``f ~ U(scale_range)`` is drawn per call
    and used for both sides (the window has the image's aspect ratio), the window's top-left corner is
    uniform over all positions that keep it inside the image, and the crop is resized back bilinearly.
    ``A.RandomResizedCrop`` does not fit: it resizes to a fixed ``size`` and samples area and absolute
    aspect ratio, not a fraction of each side.

    Args:
        scale_range: Range of the kept fraction of each side, ``0 < low <= high <= 1``.
        interpolation: OpenCV interpolation flag for the image resize.
        mask_interpolation: OpenCV interpolation flag for the mask resize.
        p: Probability of applying the transform.

    Targets:
        image, mask, bboxes, keypoints
    """

    _targets = (Targets.IMAGE, Targets.MASK, Targets.BBOXES, Targets.KEYPOINTS)

    class InitSchema(BaseTransformInitSchema):
        scale_range: tuple[float, float]
        interpolation: int
        mask_interpolation: int

        @field_validator("scale_range")
        @classmethod
        def _check_scale_range(cls, value: tuple[float, float]) -> tuple[float, float]:
            low, high = value
            if not 0 < low <= high <= 1:
                raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {value}")
            return value

    def __init__(
        self,
        scale_range: tuple[float, float] = (0.6, 0.7),
        interpolation: int = cv2.INTER_LINEAR,
        mask_interpolation: int = cv2.INTER_NEAREST,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        self.scale_range = scale_range
        self.interpolation = interpolation
        self.mask_interpolation = mask_interpolation

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw the crop window ``(x_min, y_min, x_max, y_max)`` for this call."""
        height, width = params["shape"][:2]
        fraction = self.py_random.uniform(*self.scale_range)
        crop_height = max(1, int(height * fraction))
        crop_width = max(1, int(width * fraction))
        y_min = self.py_random.randint(0, height - crop_height)
        x_min = self.py_random.randint(0, width - crop_width)
        return {"crop_coords": (x_min, y_min, x_min + crop_width, y_min + crop_height)}

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        """Crop ``img`` ``[H, W, C]`` and resize back to ``[H, W, C]``."""
        crop = fcrops.crop(img, *crop_coords)
        return fgeometric.resize(crop, params["shape"][:2], self.interpolation)

    def apply_to_mask(
        self, mask: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        """Crop a mask ``[H, W]`` / ``[H, W, C]`` and resize it back with ``mask_interpolation``."""
        crop = fcrops.crop(mask, *crop_coords)
        return fgeometric.resize(crop, params["shape"][:2], self.mask_interpolation)

    def apply_to_bboxes(
        self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        """Boxes are normalised, so cropping is all that is needed: the resize back leaves them unchanged."""
        return fcrops.crop_bboxes_by_coords(bboxes, crop_coords, params["shape"][:2])

    def apply_to_keypoints(
        self, keypoints: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any
    ) -> np.ndarray:
        """Shift keypoints into the window, then scale them by the resize factor."""
        height, width = params["shape"][:2]
        x_min, y_min, x_max, y_max = crop_coords
        cropped = fcrops.crop_keypoints_by_coords(keypoints, crop_coords)
        return fgeometric.keypoints_scale(cropped, width / (x_max - x_min), height / (y_max - y_min))


class RandomPerspective(A.DualTransform):
    """torchvision's ``RandomPerspective(distortion_scale, p)`` as an albumentations transform.

    The release's ``I+`` perspective (``T.RandomPerspective(distortion_scale=0.2, p=0.5)`` on PIL
    images). Parameters are drawn as in torchvision's ``get_params``: with ``h = H // 2``, ``w = W // 2``,
    each corner moves inwards by an integer offset drawn uniformly from ``0 .. int(d * w)`` horizontally
    and ``0 .. int(d * h)`` vertically (eight independent draws), e.g. top-left to
    ``(randint(0, int(d * w)), randint(0, int(d * h)))``, top-right to ``(W - 1 - randint(...), ...)``.
    The image is warped so that its corners ``(0, 0) .. (W - 1, H - 1)`` land on those points, on the
    same canvas, with bilinear interpolation and ``fill`` where the warped image does not reach.

    The warp reproduces PIL's ``Image.transform(PERSPECTIVE)`` that torchvision calls for PIL images, to
    within one grey level (tested): the homography is applied in PIL's pixel-corner coordinates, pixels
    whose source falls outside the image get ``fill``, the others are interpolated from the image only.
    Draws come from albumentations' own generator, so pools stay reproducible by
    ``(seed, epoch, example_id)``.

    Args:
        distortion_scale: ``d`` in ``[0, 1]``: how far corners may move, as a fraction of half the side.
        interpolation: OpenCV interpolation flag for the image.
        fill: value of the uncovered pixels (0 = black, torchvision's default).
        fill_mask: value of the uncovered mask pixels.
        p: probability of applying the transform (torchvision's default 0.5).

    Targets:
        image, mask
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    class InitSchema(BaseTransformInitSchema):
        distortion_scale: float = Field(ge=0, le=1)
        interpolation: int
        fill: float
        fill_mask: float

    def __init__(
        self,
        distortion_scale: float = 0.5,
        interpolation: int = cv2.INTER_LINEAR,
        fill: float = 0,
        fill_mask: float = 0,
        p: float = 0.5,
    ):
        super().__init__(p=p)
        self.distortion_scale = distortion_scale
        self.interpolation = interpolation
        self.fill = fill
        self.fill_mask = fill_mask

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw the corner endpoints ``[4, 2]`` (x, y; top-left, top-right, bottom-right, bottom-left)."""
        height, width = params["shape"][:2]
        dx = int(self.distortion_scale * (width // 2))
        dy = int(self.distortion_scale * (height // 2))
        randint = self.py_random.randint  # inclusive bounds, torchvision's randint(0, n + 1)
        endpoints = np.array(
            [
                [randint(0, dx), randint(0, dy)],
                [width - 1 - randint(0, dx), randint(0, dy)],
                [width - 1 - randint(0, dx), height - 1 - randint(0, dy)],
                [randint(0, dx), height - 1 - randint(0, dy)],
            ],
            dtype=np.float64,
        )
        return {"endpoints": endpoints}

    @staticmethod
    def uncovered(shape: tuple[int, ...], inverse: np.ndarray) -> np.ndarray:
        """Output pixels ``[H, W]`` whose source point falls outside the image (PIL fills those).

        Args:
            shape: the image shape ``(H, W, ...)``.
            inverse: the output -> input homography ``[3, 3]`` in PIL's pixel-corner coordinates.
        """
        height, width = shape[:2]
        # Nearest-neighbour warp of an all-ones image: 0 exactly where the source point is outside, up to
        # OpenCV's rounding of points on the edge. Those lie in a one-pixel band on either side of the
        # edge, which is decided again in double precision, term by term as PIL computes it.
        covered = cv2.warpPerspective(
            np.ones((height, width), np.uint8),
            _HALF_PIXEL_BACK @ inverse @ _HALF_PIXEL,
            (width, height),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        kernel = np.ones((3, 3), np.uint8)
        rows, cols = np.nonzero(cv2.dilate(covered, kernel) != cv2.erode(covered, kernel))
        outside = covered == 0
        if len(rows):
            source_x, source_y = _project(inverse, rows, cols)
            outside[rows, cols] = (source_x < 0) | (source_x >= width) | (source_y < 0) | (source_y >= height)
        return outside

    def _warp(self, img: np.ndarray, endpoints: np.ndarray, interpolation: int, fill: float) -> np.ndarray:
        height, width = img.shape[:2]
        inverse = _perspective_coefficients(height, width, endpoints)
        # OpenCV puts pixel centres at integer coordinates, PIL at +0.5: conjugate the map by that shift.
        centred = _HALF_PIXEL_BACK @ inverse @ _HALF_PIXEL
        out = cv2.warpPerspective(
            img,
            centred,
            (width, height),
            flags=interpolation | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,  # inside pixels interpolate from the image only, as PIL's
        )
        outside = self.uncovered(img.shape, inverse)
        # A masked copy is ~20x faster than boolean-index assignment on [H, W, C].
        out = cv2.bitwise_and(out, out, mask=(~outside).view(np.uint8))
        if fill != 0:
            out[outside] = fill
        return out

    def apply(self, img: np.ndarray, endpoints: np.ndarray, **params: Any) -> np.ndarray:
        """Warp ``img`` ``[H, W, C]`` onto the same canvas."""
        return self._warp(img, endpoints, self.interpolation, self.fill)

    def apply_to_mask(self, mask: np.ndarray, endpoints: np.ndarray, **params: Any) -> np.ndarray:
        """Warp a mask ``[H, W]`` / ``[H, W, C]`` with nearest-neighbour interpolation."""
        return self._warp(mask, endpoints, cv2.INTER_NEAREST, self.fill_mask)


_HALF_PIXEL = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], dtype=np.float64)
_HALF_PIXEL_BACK = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]], dtype=np.float64)


def _perspective_coefficients(height: int, width: int, endpoints: np.ndarray) -> np.ndarray:
    """The output -> input homography ``[3, 3]`` as torchvision's ``_get_perspective_coeffs`` computes it.

    The eight coefficients solve ``endpoints -> startpoints`` (the image corners) in double precision and
    are rounded to float32, as torchvision hands them to PIL; PIL applies them to pixel centres
    ``x + 0.5`` in pixel-corner coordinates.
    """
    startpoints = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    system = np.zeros((8, 8))
    for i, ((x, y), (u, v)) in enumerate(zip(endpoints, startpoints)):
        system[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        system[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
    coefficients = np.linalg.solve(system, startpoints.reshape(8)).astype(np.float32).astype(np.float64)
    return np.append(coefficients, 1.0).reshape(3, 3)


def _project(homography: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Source points (pixel-corner coordinates) of the centres of output pixels ``(rows, cols)``.

    Double precision and PIL's expression, term by term, so that a point on the edge of the image is
    decided as PIL decides it.
    """
    (a, b, c), (d, e, f), (g, h, _) = homography
    xs, ys = cols.astype(np.float64) + 0.5, rows.astype(np.float64) + 0.5
    denominator = g * xs + h * ys + 1
    return (a * xs + b * ys + c) / denominator, (d * xs + e * ys + f) / denominator


class RandomPatchMasking(A.ImageOnlyTransform):
    """PAPO's masked view: blacken every ``patch_size x patch_size`` cell independently with ``drop_prob``.

    The grid is anchored at the top-left pixel of the raw image; when a side is not a multiple of
    ``patch_size`` the last row/column of cells is narrower and is masked whole like the others.

    Args:
        patch_size: Side of a cell in pixels (14 = the ViT patch of Qwen2.5-VL).
        drop_prob: Probability that a cell is filled.
        fill: Value written into every channel of a masked cell (0 = black).
        p: Probability of applying the transform.
    """

    class InitSchema(BaseTransformInitSchema):
        patch_size: int = Field(ge=1)
        drop_prob: float = Field(ge=0, le=1)
        fill: float

    def __init__(self, patch_size: int = 14, drop_prob: float = 0.6, fill: float = 0, p: float = 1.0):
        super().__init__(p=p)
        self.patch_size = patch_size
        self.drop_prob = drop_prob
        self.fill = fill

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Draw which cells are masked: a bool array ``[ceil(H / patch), ceil(W / patch)]``."""
        height, width = params["shape"][:2]
        rows = -(-height // self.patch_size)
        cols = -(-width // self.patch_size)
        return {"masked_cells": self.random_generator.random((rows, cols)) < self.drop_prob}

    def apply(self, img: np.ndarray, masked_cells: np.ndarray, **params: Any) -> np.ndarray:
        """Fill the masked cells of ``img`` ``[H, W, C]``; returns a new array of the same shape."""
        height, width = img.shape[:2]
        rows, cols = masked_cells.shape
        size = self.patch_size
        cells = np.broadcast_to(masked_cells[:, None, :, None], (rows, size, cols, size))
        pixel_mask = cells.reshape(rows * size, cols * size)[:height, :width]
        keep = np.ascontiguousarray(~pixel_mask).view(np.uint8)
        # A masked copy is ~20x faster than boolean-index assignment on a [H, W, C] array.
        out = np.zeros_like(img)
        cv2.bitwise_and(img, img, dst=out, mask=keep)
        if self.fill != 0:
            out[pixel_mask] = self.fill
        return out


# --------------------------------------------------------------------------------------------------------
# Default pools (algorithm doc, section 3)
# --------------------------------------------------------------------------------------------------------


def information_preserving_transforms() -> list[A.BasicTransform]:
    """The release's ``I+`` pool: colour jitter, perspective (``p = 0.5``), rotation within +/-10 degrees.

    Returns:
        New transform instances (safe to put in a pipeline).
    """
    return [
        # torchvision's ColorJitter always applies (p=1); hue (0, 0) = no hue change.
        A.ColorJitter(
            brightness=(0.2, 1.3), contrast=(0.2, 1.8), saturation=(0.2, 1.8), hue=(0.0, 0.0), p=1.0
        ),
        # torchvision's RandomPerspective(distortion_scale=0.2, p=0.5): corners moved inwards, black border.
        # (albumentations' Perspective draws |N(0, s)| offsets and rescales the result: another distribution.)
        RandomPerspective(distortion_scale=0.2, p=0.5),
        # torchvision's RandomRotation(10): same canvas, corners filled with 0, nearest interpolation.
        A.Rotate(
            limit=(-10, 10),
            interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            crop_border=False,
            p=1.0,
        ),
    ]


def information_removing_transforms() -> list[A.BasicTransform]:
    """The release's ``I-`` pool: 50 noise-filled rectangles, or a 60-70 % zoom crop.

    Each rectangle side is ``int(U(0.05, 0.15) * side)``, placed fully inside the image, filled with
    per-pixel uniform RGB noise (``fill="random"``; albumentations' ``"random_uniform"`` would paint each
    hole one flat colour, which is not the release's noise patch).

    Returns:
        New transform instances (safe to put in a pipeline).
    """
    return [
        A.CoarseDropout(
            num_holes_range=(50, 50),
            hole_height_range=(0.05, 0.15),
            hole_width_range=(0.05, 0.15),
            fill="random",
            p=1.0,
        ),
        RandomZoomCrop(scale_range=(0.6, 0.7), p=1.0),
    ]


def papo_masking_transforms(patch_size: int = 14, drop_prob: float = 0.6) -> list[A.BasicTransform]:
    """PAPO's masked view: every ``patch_size`` cell blackened independently with ``drop_prob``.

    Args:
        patch_size: Cell side in pixels.
        drop_prob: Probability that a cell is blackened.

    Returns:
        A one-transform list.
    """
    return [RandomPatchMasking(patch_size=patch_size, drop_prob=drop_prob, p=1.0)]


_DEFAULT_TRANSFORMS = {
    PRESERVING: information_preserving_transforms,
    REMOVING: information_removing_transforms,
    MASKED: papo_masking_transforms,
}


# --------------------------------------------------------------------------------------------------------
# Seeding and input handling
# --------------------------------------------------------------------------------------------------------


def derive_view_seeds(seed: int, epoch: int, example_id: str, view: str) -> tuple[int, int]:
    """Two independent 64-bit seeds for one view of one example in one epoch.

    Stable across processes, platforms and Python versions (BLAKE2b of the UTF-8 key; never ``hash()``,
    which is salted per process). The view name is part of the key so ``I+`` and ``I-`` draws are
    independent.

    Args:
        seed: Run seed.
        epoch: Epoch index.
        example_id: Stable example identifier, e.g. ``"synthetic-train-000042"``.
        view: View name, e.g. ``"preserving"``.

    Returns:
        ``(choice_seed, transform_seed)``: one picks the transform, the other seeds its parameters.
    """
    key = "\x1f".join((str(int(seed)), str(int(epoch)), str(example_id), str(view))).encode("utf-8")
    digest = hashlib.blake2b(key, digest_size=16, person=b"cppo-views").digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def to_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A private, contiguous ``uint8`` ``[H, W, 3]`` copy of ``image``.

    Args:
        image: PIL image (any mode; converted to RGB) or numpy ``uint8`` array ``[H, W, 3]``.

    Returns:
        A new array the caller may modify.

    Raises:
        ValueError: For a numpy array that is not ``uint8`` ``[H, W, 3]`` (grayscale, RGBA, float ...).
        TypeError: For anything else.
    """
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 RGB array of shape [H, W, 3], got dtype {image.dtype} and shape "
                f"{image.shape}; "
                "convert grayscale/RGBA images with PIL's .convert('RGB') first"
            )
        return np.array(image, dtype=np.uint8, order="C", copy=True)
    raise TypeError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


# --------------------------------------------------------------------------------------------------------
# Pools and view maker
# --------------------------------------------------------------------------------------------------------


class PerturbationPool:
    """A list of size-preserving albumentations transforms; one is drawn uniformly per example.

    Each transform runs in its own ``A.Compose([...], strict=True)`` over a private deep copy, so old or
    misspelt argument names (ignored by albumentations with only a warning) fail at construction, and no
    transform instance is shared between pipelines. The drawn transform is then applied with its own
    probability ``p`` (the release's perspective has ``p = 0.5``).

    Not thread-safe (a call reseeds the pipeline); DataLoader worker processes each hold their own copy.

    Args:
        transforms: Transforms of the pool. ``None`` takes the default pool of ``view``. In YAML, a list of
            ``{class_path: albumentations.ColorJitter, init_args: {...}}``.
        view: Which view the pool produces: ``"preserving"`` (``I+``), ``"removing"`` (``I-``) or ``"masked"``
            (PAPO). Selects the default transforms and is mixed into the per-example seed, so pools of
            different views draw independently. Other names are allowed when ``transforms`` is given.
        before_resize: Apply the transforms to the raw image, before it is resized into the pixel limits
            (the view is then resized the same way, so it keeps the original view's size). None: True for
            PAPO's masked view, as PAPO masks the raw image and the processor resizes it afterwards (its
            14 px cells then cover ``14 * scale`` pixels of the model's input); False for the others, as
            the CPPO release perturbs the resized image.

    Raises:
        ValueError: Empty pool, unknown ``view`` without ``transforms``, invalid transform arguments, or a
            transform that changes the image size (the message names the transform class).
    """

    def __init__(
        self,
        transforms: Sequence[A.BasicTransform] | None = None,
        view: str = PRESERVING,
        before_resize: bool | None = None,
    ):
        if transforms is None:
            if view not in _DEFAULT_TRANSFORMS:
                raise ValueError(f"no default transforms for view {view!r}; known views: {PERTURBED_VIEWS}")
            transforms = _DEFAULT_TRANSFORMS[view]()
        transforms = list(transforms)
        if not transforms:
            raise ValueError("a perturbation pool needs at least one transform")
        for transform in transforms:
            if not isinstance(transform, A.BasicTransform):
                raise TypeError(
                    f"pool entries must be albumentations transforms, got {type(transform).__name__}"
                )
        self.view = view
        self._before_resize = before_resize
        self.transforms: list[A.BasicTransform] = [copy.deepcopy(t) for t in transforms]
        self._pipelines = [A.Compose([t], strict=True) for t in self.transforms]
        for transform in self.transforms:
            _probe_keeps_size(transform)

    def __len__(self) -> int:
        return len(self.transforms)

    @property
    def before_resize(self) -> bool:
        """Whether this pool perturbs the raw image (before the resize into the pixel limits)."""
        return self._before_resize if self._before_resize is not None else self.view == MASKED

    def __repr__(self) -> str:
        names = ", ".join(type(t).__name__ for t in self.transforms)
        return f"{type(self).__name__}(view={self.view!r}, transforms=[{names}])"

    def choose(self, seed: int, epoch: int, example_id: str) -> int:
        """Index of the transform drawn for this example and epoch (uniform over the pool)."""
        choice_seed, _ = derive_view_seeds(seed, epoch, example_id, self.view)
        return choice_seed % len(self.transforms)

    def __call__(
        self, image: np.ndarray | Image.Image, *, seed: int, epoch: int, example_id: str
    ) -> np.ndarray:
        """Draw this pool's view of ``image``.

        Args:
            image: ``uint8`` array ``[H, W, 3]`` or PIL image; not modified.
            seed: Run seed.
            epoch: Epoch index (a new epoch draws new views).
            example_id: Stable example identifier.

        Returns:
            ``uint8`` array ``[H, W, 3]``, the same ``H, W`` as the input.

        Raises:
            ValueError: If the drawn transform changed the size or dtype.
        """
        array = to_rgb_array(image)
        choice_seed, transform_seed = derive_view_seeds(seed, epoch, example_id, self.view)
        index = choice_seed % len(self.transforms)
        pipeline = self._pipelines[index]
        pipeline.set_random_seed(transform_seed)
        out = pipeline(image=array)["image"]
        _check_output(self.transforms[index], array.shape, out)
        return out


def _check_output(transform: A.BasicTransform, shape: tuple[int, ...], out: np.ndarray) -> None:
    name = type(transform).__name__
    if out.shape != shape:
        raise ValueError(
            f"transform {name} changes the image size from {shape} to {out.shape}; every perturbation must "
            "keep the size so that all views of a prompt produce the same image tokens"
        )
    if out.dtype != np.uint8:
        raise ValueError(f"transform {name} returns dtype {out.dtype}; perturbations must return uint8")


def _probe_keeps_size(transform: A.BasicTransform) -> None:
    """Apply a copy of ``transform`` (with ``p = 1``, whatever its ``p``) to an odd-sized noise image."""
    probe = copy.deepcopy(transform)
    probe.p = 1.0  # force_apply alone does not run a transform with p = 0
    image = np.random.default_rng(0).integers(0, 256, size=_PROBE_SHAPE, dtype=np.uint8)
    for seed in _PROBE_SEEDS:
        probe.set_random_seed(seed)
        _check_output(transform, image.shape, probe(image=image.copy(), force_apply=True)["image"])


def information_preserving_pool() -> PerturbationPool:
    """Default ``I+`` pool (see :func:`information_preserving_transforms`)."""
    return PerturbationPool(view=PRESERVING)


def information_removing_pool() -> PerturbationPool:
    """Default ``I-`` pool (see :func:`information_removing_transforms`)."""
    return PerturbationPool(view=REMOVING)


def papo_masking_pool(
    patch_size: int = 14, drop_prob: float = 0.6, before_resize: bool = True
) -> PerturbationPool:
    """PAPO's masked-view pool (see :func:`papo_masking_transforms`), on the raw image by default."""
    return PerturbationPool(
        papo_masking_transforms(patch_size, drop_prob), view=MASKED, before_resize=before_resize
    )


class ViewMaker:
    """Builds the image views of one prompt for one epoch; called by the DataModule per example.

    Args:
        views: Which perturbed views to produce, out of ``"preserving"``, ``"removing"``, ``"masked"``
            (CPPO: preserving + removing; PAPO: masked; GRPO: none).
        preserving: Pool for ``I+``; ``None`` = default.
        removing: Pool for ``I-``; ``None`` = default.
        masked: Pool for PAPO's masked view; ``None`` = default. A given pool whose ``view`` differs from
            its slot is used under the slot's name (a copy), so that each view draws independently.
    """

    def __init__(
        self,
        views: Sequence[ViewName] = (PRESERVING, REMOVING),
        preserving: PerturbationPool | None = None,
        removing: PerturbationPool | None = None,
        masked: PerturbationPool | None = None,
    ):
        unknown = [v for v in views if v not in PERTURBED_VIEWS]
        if unknown:
            raise ValueError(f"unknown views {unknown}; known views: {PERTURBED_VIEWS}")
        self.views = tuple(dict.fromkeys(views))
        given = {PRESERVING: preserving, REMOVING: removing, MASKED: masked}
        self.pools: dict[str, PerturbationPool] = {}
        for view in self.views:
            pool = given[view] if given[view] is not None else PerturbationPool(view=view)
            if pool.view != view:
                # The view name seeds the draw: a pool keeping another slot's name (e.g. a YAML pool left at
                # the default view) would draw the same random numbers as that view.
                pool = copy.deepcopy(pool)
                pool.view = view
            self.pools[view] = pool

    @property
    def needs_raw_image(self) -> bool:
        """Whether a pool perturbs the image before its resize (then pass ``raw`` and ``resize``)."""
        return any(pool.before_resize for pool in self.pools.values())

    def __call__(
        self,
        image: np.ndarray | Image.Image,
        *,
        seed: int,
        epoch: int,
        example_id: str,
        raw: np.ndarray | Image.Image | None = None,
        resize: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The original and the requested views of ``image``.

        Args:
            image: ``uint8`` array ``[H, W, 3]`` or PIL image, as the model sees it (resized).
            seed: Run seed.
            epoch: Epoch index.
            example_id: Stable example identifier.
            raw: The image before its resize, for pools with ``before_resize`` (None: ``image`` is used).
            resize: Turns a perturbed ``raw`` (``uint8`` ``[h, w, 3]``) into ``image``'s size, the way
                ``image`` was made from ``raw``. Required with ``raw``.

        Returns:
            ``{"original": ..., <view>: ...}``, every value ``uint8`` ``[H, W, 3]`` with ``image``'s size.

        Raises:
            ValueError: ``raw`` without ``resize``, or a resized view that does not match ``image``'s size.
        """
        original = to_rgb_array(image)
        if raw is not None and resize is None:
            raise ValueError("a raw image needs the resize that made the model's image from it")
        raw_array = to_rgb_array(raw) if raw is not None and self.needs_raw_image else None
        out = {"original": original}
        for view, pool in self.pools.items():
            out[view] = draw_view(view, pool, original, raw_array, resize, seed, epoch, example_id)
        return out


def draw_view(
    name: str,
    pool: PerturbationPool,
    original: np.ndarray,
    raw: np.ndarray | None,
    resize: Callable[[np.ndarray], np.ndarray] | None,
    seed: int,
    epoch: int,
    example_id: str,
) -> np.ndarray:
    """One view of an example: ``pool`` applied to the raw image then resized when it acts before the
    resize (and ``raw``/``resize`` are given), to the model's image otherwise.

    Args:
        name: the view's name (in errors).
        pool: the pool that draws it.
        original: ``uint8`` ``[H, W, 3]``, the image as the model sees it.
        raw: ``uint8`` ``[h, w, 3]``, the image before its resize, or None.
        resize: turns a perturbed ``raw`` into ``original``'s size.
        seed, epoch, example_id: what seeds the draw.

    Raises:
        ValueError: the resized view does not match ``original``'s size.
    """
    if not (pool.before_resize and raw is not None and resize is not None):
        return pool(original, seed=seed, epoch=epoch, example_id=example_id)
    perturbed = np.asarray(resize(pool(raw, seed=seed, epoch=epoch, example_id=example_id)))
    if perturbed.shape != original.shape:
        raise ValueError(
            f"the {name!r} view of example {example_id!r} resizes to {perturbed.shape}, the image "
            f"is {original.shape}: resize must be the one that made the image from the raw one"
        )
    return perturbed


def make_views(
    image: np.ndarray | Image.Image,
    seed: int,
    epoch: int,
    example_id: str,
    views: Sequence[ViewName] = (PRESERVING, REMOVING),
) -> dict[str, np.ndarray]:
    """One-off convenience around :class:`ViewMaker` with the default pools.

    Builds the pools on every call (a few ms); code that makes views in a loop should keep a ``ViewMaker``.

    Returns:
        ``{"original": ..., <view>: ...}``, ``uint8`` ``[H, W, 3]`` arrays.
    """
    return ViewMaker(views)(image, seed=seed, epoch=epoch, example_id=example_id)

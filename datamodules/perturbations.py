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
torchvision; where albumentations has no exact equivalent the mapping is documented at the factory.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
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

from cppo_lightning.batch import MASKED, PRESERVING, REMOVING

__all__ = [
    "MASKED",
    "PRESERVING",
    "REMOVING",
    "VIEW_NAMES",
    "PerturbationPool",
    "RandomPatchMasking",
    "RandomZoomCrop",
    "ViewMaker",
    "derive_view_seeds",
    "information_preserving_pool",
    "information_preserving_transforms",
    "information_removing_pool",
    "information_removing_transforms",
    "make_views",
    "papo_masking_pool",
    "papo_masking_transforms",
    "perspective_scale_from_distortion",
    "to_rgb_array",
]

# The perturbed views, named once for the whole project (``I+``, ``I-`` and PAPO's masked view).
VIEW_NAMES = (PRESERVING, REMOVING, MASKED)

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


def perspective_scale_from_distortion(distortion_scale: float) -> float:
    """Map torchvision's ``RandomPerspective(distortion_scale=d)`` onto ``A.Perspective(scale=...)``.

    torchvision moves each corner coordinate inwards by ``U(0, d / 2)`` of the side (mean ``d / 4``).
    albumentations moves it by ``|N(0, s)|`` of the side (mean ``s * sqrt(2 / pi)``). Equal mean
    displacement gives ``s = d / 4 * sqrt(pi / 2)``: 0.0627 for the release's ``d = 0.2``.

    albumentations maps the jittered quadrilateral onto the full canvas. With ``keep_size=True`` alone,
    2.0.8 then rescales by ``size / quadrilateral size`` a second time, which zooms in further and pushes
    the content towards the bottom-right (a centred object moves by 15 px on average at 224 px, up to
    50 px). ``fit_output=True`` fixes that: the whole warped image is fitted into the canvas and resized
    back, like torchvision's result (the full image, warped, black where it does not reach).

    Args:
        distortion_scale: torchvision's ``distortion_scale``, in ``[0, 1]``.

    Returns:
        The albumentations ``scale`` (standard deviation, as a fraction of the side).
    """
    return distortion_scale / 4 * math.sqrt(math.pi / 2)


def information_preserving_transforms() -> list[A.BasicTransform]:
    """The release's ``I+`` pool: colour jitter, perspective (``p = 0.5``), rotation within +/-10 degrees.

    Returns:
        New transform instances (safe to put in a pipeline).
    """
    perspective_scale = perspective_scale_from_distortion(0.2)
    return [
        # torchvision's ColorJitter always applies (p=1); hue (0, 0) = no hue change.
        A.ColorJitter(
            brightness=(0.2, 1.3), contrast=(0.2, 1.8), saturation=(0.2, 1.8), hue=(0.0, 0.0), p=1.0
        ),
        A.Perspective(
            scale=(perspective_scale, perspective_scale),
            keep_size=True,
            fit_output=True,  # see perspective_scale_from_distortion: keep_size alone over-zooms in 2.0.8
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            p=0.5,
        ),
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

    Raises:
        ValueError: Empty pool, unknown ``view`` without ``transforms``, invalid transform arguments, or a
            transform that changes the image size (the message names the transform class).
    """

    def __init__(self, transforms: Sequence[A.BasicTransform] | None = None, view: str = PRESERVING):
        if transforms is None:
            if view not in _DEFAULT_TRANSFORMS:
                raise ValueError(f"no default transforms for view {view!r}; known views: {VIEW_NAMES}")
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
        self.transforms: list[A.BasicTransform] = [copy.deepcopy(t) for t in transforms]
        self._pipelines = [A.Compose([t], strict=True) for t in self.transforms]
        for transform in self.transforms:
            _probe_keeps_size(transform)

    def __len__(self) -> int:
        return len(self.transforms)

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


def papo_masking_pool(patch_size: int = 14, drop_prob: float = 0.6) -> PerturbationPool:
    """PAPO's masked-view pool (see :func:`papo_masking_transforms`)."""
    return PerturbationPool(papo_masking_transforms(patch_size, drop_prob), view=MASKED)


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
        unknown = [v for v in views if v not in VIEW_NAMES]
        if unknown:
            raise ValueError(f"unknown views {unknown}; known views: {VIEW_NAMES}")
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

    def __call__(
        self, image: np.ndarray | Image.Image, *, seed: int, epoch: int, example_id: str
    ) -> dict[str, np.ndarray]:
        """The original and the requested views of ``image``.

        Args:
            image: ``uint8`` array ``[H, W, 3]`` or PIL image.
            seed: Run seed.
            epoch: Epoch index.
            example_id: Stable example identifier.

        Returns:
            ``{"original": ..., <view>: ...}``, every value ``uint8`` ``[H, W, 3]`` with the input's size.
        """
        original = to_rgb_array(image)
        out = {"original": original}
        for view, pool in self.pools.items():
            out[view] = pool(original, seed=seed, epoch=epoch, example_id=example_id)
        return out


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

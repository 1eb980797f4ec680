"""The views ``cppo audit`` scores, drawn from a data module's perturbation pools.

For every example the audit needs, besides the original image: each transform of the ``I+`` and ``I-``
pools **on its own and applied** (``p = 1``, whatever its ``p`` in the pool), optional candidate transforms
(a YAML file), the flat-grey floor, and one draw of each pool **as configured** (what training draws for that
example at that epoch: the transform chosen uniformly, applied with its ``p``). Seeds come from
``(seed, epoch, example id)`` exactly as in training, so the pool draws are the training run's views.

The views reach the policy through the data module's own example checks, resize and processor
(:class:`~datamodules.vqa.VQADataset` with :class:`AuditViewMaker` in place of its view maker).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import yaml
from PIL import Image

from cppo_lightning.audit.views import FLOOR, GREY, POOL, AuditView
from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING, PromptBatch
from datamodules.perturbations import PerturbationPool, draw_view, to_rgb_array
from datamodules.vqa import VisualQADataModule, VQADataset

log = logging.getLogger(__name__)

__all__ = [
    "GREY_LEVEL",
    "AuditViewMaker",
    "audit_batches",
    "audit_dataset",
    "load_candidates",
    "transform_config",
]

#: The floor's flat grey (the middle of the uint8 range).
GREY_LEVEL = 128
_POOLS = (PRESERVING, REMOVING)


def transform_config(transform: A.BasicTransform) -> dict[str, Any]:
    """``{class_path, init_args}`` of a transform, as a data config writes it (for proposed pools)."""
    arguments = transform.to_dict()["transform"]
    name = type(transform).__name__
    module = "albumentations" if getattr(A, name, None) is type(transform) else type(transform).__module__
    init_args = {key: _plain(value) for key, value in arguments.items() if key != "__class_fullname__"}
    return {"class_path": f"{module}.{name}", "init_args": init_args}


def _plain(value: Any) -> Any:
    """Tuples as lists, all the way down (YAML and JSON write lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def load_candidates(path: str | Path) -> dict[str, list[A.BasicTransform]]:
    """Candidate transforms from a YAML file with ``preserving`` and/or ``removing`` lists.

    Each entry is ``{class_path: albumentations.ToGray, init_args: {...}}``, as in a pool's ``transforms``.

    Raises:
        ValueError: an unknown key, or an entry that is not a transform (the message names it).
    """
    from lightning.pytorch.cli import instantiate_class

    content = yaml.safe_load(Path(path).read_text()) or {}
    unknown = sorted(set(content) - set(_POOLS))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; candidates go under 'preserving' and 'removing'")
    candidates: dict[str, list[A.BasicTransform]] = {}
    for role in _POOLS:
        for number, entry in enumerate(content.get(role) or []):
            where = f"{path}: {role}[{number}]"
            if not isinstance(entry, Mapping) or "class_path" not in entry:
                raise ValueError(f"{where} needs a class_path (and optional init_args), got {entry!r}")
            try:
                transform = instantiate_class((), {"init_args": {}, **entry})
                if not isinstance(transform, A.BasicTransform):
                    raise TypeError("not an albumentations transform")
                # As in a configured pool: misspelt arguments and size changes are errors.
                PerturbationPool([transform], view=role)
            except Exception as error:  # the constructor's own message says what is wrong
                raise ValueError(f"{where} ({entry['class_path']}): {error}") from error
            candidates.setdefault(role, []).append(transform)
    return candidates


def _single(transform: A.BasicTransform, view: str, before_resize: bool) -> PerturbationPool:
    """A one-transform pool that always applies it (the transform's own ``p`` set to 1)."""
    forced = copy.deepcopy(transform)
    forced.p = 1.0
    return PerturbationPool([forced], view=view, before_resize=before_resize)


def _in_slot(pool: PerturbationPool, view: str) -> PerturbationPool:
    # The view name seeds the draw (see ViewMaker): a pool kept at another name draws as that view.
    if pool.view == view:
        return pool
    pool = copy.deepcopy(pool)
    pool.view = view
    return pool


class AuditViewMaker:
    """Draws every audited view of one example (a drop-in for :class:`~datamodules.perturbations.ViewMaker`).

    Args:
        preserving: the ``I+`` pool as configured.
        removing: the ``I-`` pool as configured.
        candidates: extra transforms to audit, ``"preserving"``/``"removing"`` -> transforms.

    Attributes:
        views: the :class:`~cppo_lightning.audit.AuditView` of each drawn view, in drawing order.
    """

    def __init__(
        self,
        preserving: PerturbationPool,
        removing: PerturbationPool,
        candidates: Mapping[str, Sequence[A.BasicTransform]] | None = None,
    ) -> None:
        self.pools = {PRESERVING: _in_slot(preserving, PRESERVING), REMOVING: _in_slot(removing, REMOVING)}
        self.views: list[AuditView] = []
        self._draws: dict[str, PerturbationPool | None] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        for role, pool in self.pools.items():
            for number, transform in enumerate(pool.transforms):
                self._add(f"{role}:{number}", role, transform, False, pool.before_resize)
            for number, transform in enumerate((candidates or {}).get(role, [])):
                self._add(f"{role}:candidate:{number}", role, transform, True, False)
        self.views.append(AuditView(GREY, FLOOR, "flat grey", f"every pixel {GREY_LEVEL}"))
        self._draws[GREY] = None
        for role, pool in self.pools.items():
            name = f"{POOL}:{role}"
            self.views.append(AuditView(name, POOL, f"{role} pool as configured", repr(pool), pool=role))
            self._draws[name] = pool

    def _add(self, name: str, role: str, transform: A.BasicTransform, candidate: bool, before: bool) -> None:
        self.views.append(
            AuditView(
                name=name,
                role=role,
                label=type(transform).__name__,
                description=repr(transform),
                probability=float(transform.p),
                candidate=candidate,
            )
        )
        self._draws[name] = _single(transform, role, before)
        self.configs[name] = transform_config(transform)

    @property
    def needs_raw_image(self) -> bool:
        """Whether a pool perturbs the raw image (before the resize into the pixel limits)."""
        return any(pool.before_resize for pool in self._draws.values() if pool is not None)

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
        """``{"original": ..., <view name>: ...}``, each uint8 ``[H, W, 3]`` of ``image``'s size."""
        original = to_rgb_array(image)
        raw_array = to_rgb_array(raw) if raw is not None else None
        out = {ORIGINAL: original}
        for name, pool in self._draws.items():
            if pool is None:
                out[name] = np.full_like(original, GREY_LEVEL)
            else:
                out[name] = draw_view(name, pool, original, raw_array, resize, seed, epoch, example_id)
        return out


def audit_dataset(
    datamodule: VisualQADataModule,
    candidates: Mapping[str, Sequence[A.BasicTransform]] | None = None,
    split: str = "train",
) -> tuple[VQADataset, AuditViewMaker]:
    """The data module's checked examples of ``split``, drawing the audit's views.

    Args:
        datamodule: the config's data module (its pools, processor, limits and checks).
        candidates: extra transforms to audit.
        split: ``"train"`` (where the pools act), ``"val"`` or ``"test"``.

    Raises:
        ValueError: an unknown split, or a split the data module has no source for.
    """
    stages = {"train": "fit", "val": "validate", "test": "test"}
    if split not in stages:
        raise ValueError(f"unknown split {split!r}; choose among {sorted(stages)}")
    datamodule.setup(stages[split])
    datasets = datamodule.datasets.get(split) or []
    if not datasets:
        raise ValueError(f"the data module has no {split!r} source to audit")
    maker = AuditViewMaker(
        datamodule.pools[PRESERVING] or PerturbationPool(view=PRESERVING),
        datamodule.pools[REMOVING] or PerturbationPool(view=REMOVING),
        candidates,
    )
    dataset = copy.copy(datasets[0])
    dataset.view_maker, dataset.keep_images = maker, True
    return dataset, maker


def audit_batches(
    dataset: VQADataset, count: int, batch_size: int, pad_token_id: int, epoch: int = 0
) -> Iterator[PromptBatch]:
    """The first ``count`` examples of ``dataset`` (all of them if it has fewer) in batches, views drawn
    for ``epoch``."""
    if count < 1 or batch_size < 1:
        raise ValueError(f"count ({count}) and batch_size ({batch_size}) must be >= 1")
    if count > len(dataset):
        log.warning(
            "the split has %d usable examples, fewer than the %d asked for: auditing all", len(dataset), count
        )
    indices = list(range(min(count, len(dataset))))
    for start in range(0, len(indices), batch_size):
        examples = [dataset[(index, epoch)] for index in indices[start : start + batch_size]]
        yield PromptBatch.from_examples(examples, pad_token_id)

"""LightningDataModules for visual question answering with verifiable answers.

:class:`VisualQADataModule` reads any ``datasets`` source (hub id, parquet/json/jsonl/csv, a
``save_to_disk`` folder, an image folder with metadata), checks every example at set-up (counted skips
with reasons), and yields :class:`~cppo_lightning.batch.PromptBatch` es whose prompts carry the image
views the objective needs: the original ``I``, the information-preserving ``I+`` and the
information-removing ``I-`` (CPPO), or PAPO's masked view. The processor runs in the data workers.

:class:`SyntheticVQADataModule` is the same over the embedded synthetic perception task.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as pl
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from cppo_lightning.batch import MASKED, ORIGINAL, PRESERVING, REMOVING, PromptBatch
from datamodules.examples import (
    DEFAULT_PROMPT_TEMPLATE,
    SPECIAL_TOKEN_POLICIES,
    ExampleError,
    ImageLimits,
    PromptEncoder,
    SkipReport,
    check_image_tags,
    clean_answer,
    clean_question,
    example_ids,
    fit_pixels,
    open_image,
    to_rgb,
    write_skipped,
)
from datamodules.perturbations import PerturbationPool, ViewMaker
from datamodules.sampling import EpochProgress, ResumableDataLoader, ResumableSampler
from datamodules.sources import Columns, DataSource, load_source, resolve_columns
from datamodules.synthetic import SyntheticTaskConfig, generate_split, to_hf_dataset

log = logging.getLogger(__name__)

_DEFAULT_VIEWS = (ORIGINAL, PRESERVING, REMOVING)
_METADATA_TYPES = (str, int, float, bool)


def _model_type(path: str) -> str | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "model_type", None)


class VQADataset(Dataset):
    """Checked examples of one source. Items are requested as ``(index, epoch)``: the views depend on both.

    Args:
        dataset: the loaded split (images undecoded).
        rows: the rows that passed the checks.
        ids: example id of each kept row.
        columns: resolved column names.
        encoder: turns an example into model inputs.
        limits: image pixel limits.
        image_root: folder for relative image paths.
        view_maker: draws the perturbed views (None: original only).
        seed: view seed.
        keep_images: keep the raw view images in the encoded example (for visualisation).
        allow_outside_root: accept image paths outside ``image_root``.
        source: name of the source in messages.
        max_failures: examples whose image may become unreadable after set-up before loading stops.
        skipped_path: ``skipped.jsonl`` to append such examples to (every process appends its own).

    An example whose image cannot be read any more (deleted or changed after set-up) is not a crash: it is
    logged with its id, counted in ``failures``, appended to ``skipped_path``, and replaced in its batch by
    the next readable example (deterministically, so a resumed run sees the same batches).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        rows: list[int],
        ids: list[str],
        columns: dict[str, str | None],
        encoder: PromptEncoder,
        limits: ImageLimits,
        image_root,
        view_maker: ViewMaker | None,
        seed: int,
        keep_images: bool = True,
        allow_outside_root: bool = False,
        source: str = "data",
        max_failures: int | None = None,
        skipped_path: str | Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.rows = rows
        self.ids = ids
        self.columns = columns
        self.encoder = encoder
        self.limits = limits
        self.image_root = image_root
        self.view_maker = view_maker
        self.seed = seed
        self.keep_images = keep_images
        self.allow_outside_root = allow_outside_root
        self.source = source
        self.max_failures = max_failures
        self.skipped_path = skipped_path
        #: id -> reason of the examples whose image could not be read after set-up (in this process).
        self.failures: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def raw_image(self, index: int) -> Image.Image:
        """The checked RGB image of example ``index`` as stored (before the pixel limits)."""
        value = self.dataset[self.rows[index]][self.columns["image"]]
        return to_rgb(open_image(value, self.image_root, self.allow_outside_root))

    def resize(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """``image`` resized into the pixel limits, as uint8 ``[H, W, 3]``."""
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
        return np.asarray(fit_pixels(image, self.limits))

    def image(self, index: int) -> np.ndarray:
        """The checked, RGB, pixel-limited image of example ``index`` as uint8 ``[H, W, 3]``."""
        return self.resize(self.raw_image(index))

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        for offset in range(len(self.rows)):
            candidate = (index + offset) % len(self.rows)
            if self.ids[candidate] in self.failures:
                continue
            try:
                return self._encode(candidate, epoch)
            except ExampleError as error:
                self._failed(candidate, error, epoch)
        raise RuntimeError(f"{self.source}: no example has a readable image any more")

    def _failed(self, index: int, error: ExampleError, epoch: int) -> None:
        example_id = self.ids[index]
        self.failures[example_id] = error.reason
        log.warning(
            "%s: example %r (row %d) cannot be loaded any more (%s): replaced by the next readable example "
            "(%d such examples so far in this process)",
            self.source,
            example_id,
            self.rows[index],
            error,
            len(self.failures),
        )
        if self.skipped_path is not None:
            entry = {
                "source": self.source,
                "id": example_id,
                "row": self.rows[index],
                "reason": error.reason,
                "detail": str(error),
                "when": f"loading, epoch {epoch}",
            }
            # One short line per write, appended: safe from several worker processes and ranks.
            with open(self.skipped_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
        if self.max_failures is not None and len(self.failures) > self.max_failures:
            raise RuntimeError(
                f"{self.source}: {len(self.failures)} of {len(self.rows)} examples became unreadable after "
                f"set-up (more than max_skip_fraction allows), e.g. {list(self.failures)[:3]}: "
                "has the data changed since the run started?"
            )

    def _encode(self, index: int, epoch: int):
        row = self.dataset[self.rows[index]]
        example_id = self.ids[index]
        raw = self.raw_image(index)
        image = self.resize(raw)
        if self.view_maker is not None:
            # PAPO's mask is drawn on the raw image and resized like the original (before_resize pools).
            views = self.view_maker(
                image, seed=self.seed, epoch=epoch, example_id=example_id, raw=raw, resize=self.resize
            )
        else:
            views = {ORIGINAL: image}
        skip = {self.columns["image"], self.columns["question"], self.columns["answer"]}
        metadata = {k: v for k, v in row.items() if k not in skip and isinstance(v, _METADATA_TYPES)}
        return self.encoder.encode(
            example_id,
            views,
            clean_question(row[self.columns["question"]]),
            clean_answer(row[self.columns["answer"]]),
            metadata,
            keep_images=self.keep_images,
        )


def check_examples(
    dataset: datasets.Dataset,
    columns: dict[str, str | None],
    ids: list[str],
    encoder: PromptEncoder,
    limits: ImageLimits,
    image_root,
    report: SkipReport,
    strict: bool,
    allow_outside_root: bool = False,
) -> list[int]:
    """Rows of ``dataset`` that pass every check; each failure counted in ``report`` (or raised if ``strict``).

    Raises:
        ValueError: ``strict`` and an example fails (the message names it, the field and the reason).
    """
    kept = []
    needed = [columns["image"], columns["question"], columns["answer"]]
    # The benchmarks' options (also appended to their questions): checked under their own name.
    choices = "choices" if "choices" in dataset.column_names and "choices" not in needed else None
    for row, example in enumerate(dataset.select_columns(needed + ([choices] if choices else []))):
        example_id = ids[row]
        report.total += 1
        try:
            answer = clean_answer(example[columns["answer"]], columns["answer"])
            if not answer:
                raise ExampleError("missing answer", f"field {columns['answer']!r} is empty")
            question = clean_question(example[columns["question"]], columns["question"])
            if not question:
                raise ExampleError("missing question", f"field {columns['question']!r} is empty")
            if choices and example[choices]:
                encoder.text(str(example[choices]), choices)
            question = encoder.text(question, columns["question"])
            encoder.text(answer, columns["answer"])
            raw = open_image(example[columns["image"]], image_root, allow_outside_root)
            check_image_tags(example[columns["question"]], images=1)
            image = fit_pixels(to_rgb(raw), limits)
            length = encoder.check(question, image)
        except ExampleError as error:
            if strict:
                raise ValueError(f"{report.source}: example {example_id!r} (row {row}): {error}") from None
            detail = str(error)
            detail = detail[len(error.reason) + 2 :] if detail.startswith(f"{error.reason}: ") else ""
            report.add(error.reason, example_id, detail, row)
            continue
        # Counted only for kept examples: the summary's conversions are among the examples trained on.
        if raw.mode != "RGB":
            report.converted[raw.mode] += 1
        if length > report.longest_prompt[0]:
            report.longest_prompt = (length, example_id)
        kept.append(row)
    return kept


def _check_arguments(
    prompt_template: str,
    batch_size: int,
    eval_batch_size: int | None,
    min_pixels: int | None,
    max_pixels: int | None,
    max_prompt_tokens: int | None,
    views: list[str] | None,
    max_skip_fraction: float,
    num_workers: int,
    special_tokens_in_text: str = "skip",
) -> None:
    """Refuse DataModule arguments that cannot work, all at once, before anything is loaded."""
    problems = []
    if special_tokens_in_text not in SPECIAL_TOKEN_POLICIES:
        problems.append(
            f"special_tokens_in_text must be one of {list(SPECIAL_TOKEN_POLICIES)}, got {special_tokens_in_text!r}"
        )
    if "{question}" not in prompt_template:
        problems.append(f"prompt_template must contain '{{question}}', got {prompt_template!r}")
    for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be >= 1, got {value!r}")
    for name, value in (
        ("min_pixels", min_pixels),
        ("max_pixels", max_pixels),
        ("max_prompt_tokens", max_prompt_tokens),
    ):
        if value is not None and (not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be >= 1 or null, got {value!r}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        problems.append(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    known = (ORIGINAL, PRESERVING, REMOVING, MASKED)
    unknown = [view for view in views or [] if view not in known]
    if unknown:
        problems.append(f"unknown views {unknown}; choose among {list(known)}")
    if not isinstance(max_skip_fraction, (int, float)) or not 0 <= max_skip_fraction <= 1:
        problems.append(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        problems.append(f"num_workers must be >= 0, got {num_workers!r}")
    if problems:
        raise ValueError("data: " + "; ".join(problems))


class VisualQADataModule(pl.LightningDataModule):
    """Visual QA with verifiable answers, with the perturbed image views CPPO/PAPO need.

    Args:
        train: the training source.
        val: validation sources (each is its own dataloader and avg@k metric).
        test: test sources.
        processor_name_or_path: the policy's checkpoint (the CLI links it to ``model.policy``).
        batch_size: prompts per training step and device (each is rolled out ``G`` times).
        eval_batch_size: prompts per validation/test batch (default: ``batch_size``).
        prompt_template: format string with ``{question}``; default: the release's think/boxed instruction.
        system_prompt: optional system message.
        min_pixels: smallest image area (default: the processor's); smaller images are upscaled.
        max_pixels: largest image area (default: the processor's); larger images are downscaled
            (instead of being dropped as in the reference release).
        max_prompt_tokens: longest prompt (text + image tokens); longer ones are counted skips.
        views: image views to produce; None: the ones the module's objective needs (``required_views``),
            or all of CPPO's when used without ``CPPOModule``.
        preserving_pool: ``I+`` transforms (default: the release's pool).
        removing_pool: ``I-`` transforms (default: the release's pool).
        masked_pool: PAPO's masked-view transforms (default: 14 px patches blackened with p = 0.6).
        strict: raise on the first bad example instead of skipping it.
        special_tokens_in_text: a question, answer or choice holding one of the tokenizer's special tokens
            (``<|im_end|>``, ``<|image_pad|>`` ...) is a counted skip (``"skip"``), or its tokens are escaped
            into plain text (``"escape"``); never live chat or image markers.
        max_skip_fraction: set-up stops (with the summary) when a source loses more than this share of its
            examples to skips; 1.0 accepts any loss.
        skipped_path: where every skipped example is listed (JSON lines: source, id, row, reason, detail);
            default: ``skipped.jsonl`` in the run folder when the trainer has a logger, else nowhere.
        num_workers: DataLoader worker processes (views and processor run there).
        seed: seed of shuffling and of the view draws (with the epoch and example id).
        shuffle: shuffle the training set every epoch.
        keep_images: keep the raw view images in batches (for the visualisation callback).
    """

    def __init__(
        self,
        train: DataSource | None = None,
        val: list[DataSource] | None = None,
        test: list[DataSource] | None = None,
        processor_name_or_path: str = "tiny:qwen2_5_vl-smoke",
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        system_prompt: str | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        max_prompt_tokens: int | None = 4096,
        views: list[str] | None = None,
        preserving_pool: PerturbationPool | None = None,
        removing_pool: PerturbationPool | None = None,
        masked_pool: PerturbationPool | None = None,
        strict: bool = False,
        special_tokens_in_text: Literal["skip", "escape"] = "skip",
        max_skip_fraction: float = 0.2,
        skipped_path: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        keep_images: bool = True,
    ) -> None:
        super().__init__()
        _check_arguments(
            prompt_template=prompt_template,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            max_prompt_tokens=max_prompt_tokens,
            views=views,
            max_skip_fraction=max_skip_fraction,
            num_workers=num_workers,
            special_tokens_in_text=special_tokens_in_text,
        )
        self.train_source = train
        self.val_sources = list(val or [])
        self.test_sources = list(test or [])
        self.processor_name_or_path = processor_name_or_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.prompt_template = prompt_template
        self.system_prompt = system_prompt
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_prompt_tokens = max_prompt_tokens
        self.views = tuple(views) if views is not None else None
        self.pools = {PRESERVING: preserving_pool, REMOVING: removing_pool, MASKED: masked_pool}
        self.strict = strict
        self.special_tokens_in_text = special_tokens_in_text
        self.max_skip_fraction = max_skip_fraction
        self.skipped_path = skipped_path
        self.num_workers = num_workers
        self.seed = seed
        self.shuffle = shuffle
        self.keep_images = keep_images
        self.processor = None
        self.datasets: dict[str, list[VQADataset]] = {}
        self.skip_reports: list[SkipReport] = []
        self.progress = EpochProgress()
        self._skipped_file: Path | None = None

    # ------------------------------------------------------------------ set-up

    def _load_processor(self):
        if self.processor is None:
            from cppo_lightning.models import load_processor

            self.processor = load_processor(self.processor_name_or_path)
        return self.processor

    def image_limits(self) -> ImageLimits:
        """Pixel limits: the configured ones, else the processor's, as the architecture table sizes images.

        Dynamic-resolution models (Qwen): sides multiples of patch x merge, the processor's
        ``shortest/longest_edge`` (areas in pixels) as bounds. Fixed-size and tiled ones (LLaVA, Gemma 3,
        Idefics3): no rounding; only a configured ``max_pixels``/``min_pixels`` resizes.
        """
        from cppo_lightning.architectures import architecture
        from cppo_lightning.models import resolve_model_path

        image_processor = self._load_processor().image_processor
        arch = architecture(_model_type(resolve_model_path(self.processor_name_or_path)))
        factor, low, high = arch.image_sizing(image_processor)
        return ImageLimits(
            min_pixels=self.min_pixels if self.min_pixels is not None else low,
            max_pixels=self.max_pixels if self.max_pixels is not None else high,
            factor=factor,
        )

    def wanted_views(self) -> tuple[str, ...]:
        """The views training batches carry."""
        if self.views is not None:
            views = self.views
        else:
            module = self.trainer.lightning_module if self._trainer_attached() else None
            views = getattr(module, "required_views", None) or _DEFAULT_VIEWS
        unknown = [view for view in views if view not in (ORIGINAL, PRESERVING, REMOVING, MASKED)]
        if unknown:
            raise ValueError(
                f"unknown views {unknown}; choose among {[ORIGINAL, PRESERVING, REMOVING, MASKED]}"
            )
        return tuple(dict.fromkeys((ORIGINAL, *views)))

    def _trainer_attached(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def _sources(self, stage: str) -> list[tuple[str, DataSource | datasets.Dataset]]:
        """(name, source) pairs of a stage; subclasses may return in-memory datasets."""
        if stage == "train":
            return [(self.train_source.display_name, self.train_source)] if self.train_source else []
        sources = self.val_sources if stage == "val" else self.test_sources
        return [(source.display_name, source) for source in sources]

    def _load(
        self, name: str, source: DataSource | datasets.Dataset, report: SkipReport
    ) -> tuple[datasets.Dataset, Columns, Path | None]:
        """The split of a source, its column names and the folder of relative image paths.

        Subclasses may reshape the rows here (the benchmarks' data module does); rows they drop must be
        counted in ``report`` (``total`` and a reason each), like the checks that follow count theirs.
        """
        if isinstance(source, DataSource):
            return load_source(source, report), source.columns, source.resolved_image_root()
        return source, Columns(), None

    def _build(
        self, stage: str, name: str, source: DataSource | datasets.Dataset, views: tuple[str, ...]
    ) -> VQADataset:
        report = SkipReport(source=f"{stage}:{name}")
        dataset, column_config, image_root = self._load(name, source, report)
        allow_outside = getattr(source, "allow_outside_image_root", False)
        columns = resolve_columns(dataset, column_config, name)
        ids = example_ids(dataset[columns["id"]] if columns["id"] else None, name, len(dataset))
        encoder = PromptEncoder(
            self._load_processor(),
            self.prompt_template,
            self.system_prompt,
            max_prompt_tokens=self.max_prompt_tokens,
            special_tokens_in_text=self.special_tokens_in_text,
        )
        limits = self.image_limits()
        rows = check_examples(
            dataset, columns, ids, encoder, limits, image_root, report, self.strict, allow_outside
        )
        self.skip_reports.append(report)
        report.log_summary()
        self._write_skipped()
        if not rows:
            raise ValueError(f"{report.summary()}: no usable example left")
        if report.fraction > self.max_skip_fraction:
            where = f" (every skip is listed in {self._skipped_file})" if self._skipped_file else ""
            raise ValueError(
                f"{report.summary()}: {report.fraction:.0%} of the examples were skipped, more than "
                f"max_skip_fraction={self.max_skip_fraction}{where}. Fix the data (or its column "
                "mapping), or raise max_skip_fraction to use what is left."
            )
        view_maker = None
        if stage == "train" and len(views) > 1:
            view_maker = ViewMaker(
                [v for v in views if v != ORIGINAL], **{v: self.pools[v] for v in views if v != ORIGINAL}
            )
        return VQADataset(
            dataset,
            rows,
            [ids[r] for r in rows],
            columns,
            encoder,
            limits,
            image_root,
            view_maker,
            self.seed,
            self.keep_images,
            allow_outside_root=allow_outside,
            source=report.source,
            max_failures=math.floor(self.max_skip_fraction * len(rows)),
            skipped_path=self._skipped_file,
        )

    def _resolve_skipped_file(self) -> Path | None:
        if self.skipped_path is not None:
            return Path(self.skipped_path)
        trainer = self.trainer if self._trainer_attached() else None
        if trainer is None or not trainer.loggers:
            return None  # no run folder: nothing is written (the summary is still logged)
        log_dir = trainer.log_dir  # on every rank: it broadcasts from rank zero
        return Path(log_dir) / "skipped.jsonl" if log_dir else None

    def _write_skipped(self) -> None:
        rank_zero = not self._trainer_attached() or self.trainer.is_global_zero
        if self._skipped_file is not None and rank_zero:
            write_skipped(self._skipped_file, self.skip_reports)

    @property
    def longest_prompt(self) -> tuple[int, str] | None:
        """``(tokens, example id)`` of the longest prompt (text + image tokens) kept at set-up, or None."""
        lengths = [report.longest_prompt for report in self.skip_reports if report.longest_prompt[0]]
        return max(lengths) if lengths else None

    @property
    def load_failures(self) -> dict[str, dict[str, str]]:
        """Source -> {id: reason} of examples whose image became unreadable after set-up (this process)."""
        return {
            dataset.source: dict(dataset.failures)
            for datasets_ in self.datasets.values()
            for dataset in datasets_
            if dataset.failures
        }

    @override
    def setup(self, stage: str) -> None:
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(
            stage, ()
        )
        if self._skipped_file is None:
            self._skipped_file = self._resolve_skipped_file()
        for split in wanted:
            if split in self.datasets:
                continue
            views = self.wanted_views() if split == "train" else (ORIGINAL,)
            self.datasets[split] = [
                self._build(split, name, source, views) for name, source in self._sources(split)
            ]
        if stage == "fit" and not self.datasets.get("train"):
            raise ValueError("fit needs a training source: set data.train")

    # ------------------------------------------------------------------ loaders

    def _collate(self):
        return functools.partial(PromptBatch.from_examples, pad_token_id=self._pad_token_id())

    def _pad_token_id(self) -> int:
        tokenizer = self._load_processor().tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @override
    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"][0]
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self._trainer_attached() else (1, 0)
        )
        sampler = ResumableSampler(
            dataset,
            self.batch_size,
            num_replicas=world,
            rank=rank,
            shuffle=self.shuffle,
            seed=self.seed,
            drop_last=True,
            progress=self.progress,
        )
        batches = len(sampler) // self.batch_size
        if batches == 0:
            raise ValueError(
                f"the training set has {len(dataset)} usable examples ({len(sampler)} per rank over {world} ranks): "
                f"fewer than one batch of {self.batch_size}"
            )
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            progress=self.progress,
            batches_per_epoch=batches,
        )

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [
            DataLoader(
                dataset,
                batch_size=self.eval_batch_size,
                shuffle=False,
                collate_fn=self._collate(),
                num_workers=self.num_workers,
            )
            for dataset in self.datasets.get(split, [])
        ]

    @override
    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    @override
    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Counted when the batch reaches the module (not when a worker prefetched it): this is the position
        # a checkpoint must resume from.
        if self._trainer_attached() and self.trainer.training:
            self.progress.consumed_batches += 1
        return batch

    @property
    def eval_names(self) -> dict[str, list[str]]:
        """Names of the validation and test sources, in dataloader order."""
        return {
            "val": [name for name, _ in self._sources("val")],
            "test": [name for name, _ in self._sources("test")],
        }


class SyntheticVQADataModule(VisualQADataModule):
    """The embedded synthetic perception task (shapes, colours, counts, positions) as a DataModule.

    Args:
        task: difficulty knobs of the generator.
        train_size: training examples.
        val_size: validation examples (0: no validation).
        test_size: test examples (0: no test split).
        data_seed: generator seed; the splits are fixed by it and never share an image.
        **kwargs: everything :class:`VisualQADataModule` takes (batch size, views, pools, workers ...).
    """

    def __init__(
        self,
        task: SyntheticTaskConfig | None = None,
        train_size: int = 512,
        val_size: int = 64,
        test_size: int = 128,
        data_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        sizes = {"train_size": train_size, "val_size": val_size, "test_size": test_size}
        bad = {name: value for name, value in sizes.items() if not isinstance(value, int) or value < 0}
        if bad:
            raise ValueError(f"data: sizes must be integers >= 0, got {bad}")
        self.task = task or SyntheticTaskConfig()
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.data_seed = data_seed
        self._generated: dict[str, datasets.Dataset] = {}

    _SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}

    def _sources(self, stage: str) -> list[tuple[str, datasets.Dataset]]:
        if not self.sizes[stage]:
            return []
        if stage not in self._generated:
            split = self._SPLIT_NAMES[stage]
            self._generated[stage] = to_hf_dataset(
                generate_split(self.task, split, self.sizes[stage], self.data_seed)
            )
        return [(f"synthetic-{self._SPLIT_NAMES[stage]}", self._generated[stage])]

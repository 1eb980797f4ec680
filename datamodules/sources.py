"""Where examples come from: a hub dataset, local files or a ``save_to_disk`` folder, via ``datasets``.

Column names are configurable; by default they are detected from common schemas, so ViRL39K
(``question``/``answer``/``image`` (a list of one image)/``qid``) and its ``problem``/``images``
variants work out of the box.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import datasets

if TYPE_CHECKING:
    from datamodules.examples import SkipReport

log = logging.getLogger(__name__)

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv"}
_CANDIDATES = {
    "image": ("image", "images", "image_path", "img"),
    "question": ("question", "problem", "query", "prompt"),
    "answer": ("answer", "solution", "answers", "ground_truth", "label"),
    "id": ("id", "qid", "question_id", "pid", "index", "idx"),
}


@dataclass
class Columns:
    """Column names; None: detected (first present of the usual names).

    Args:
        image: one image per example (a decoded image, bytes, a path, or a list holding one of those).
        question: the question text (``<image>`` placeholders are removed: the chat template places the image).
        answer: the verifiable reference answer (a ``\\boxed{}`` wrapper is fine).
        id: a stable example id (default: ``<source>-<row>``).
    """

    image: str | None = None
    question: str | None = None
    answer: str | None = None
    id: str | None = None


@dataclass
class DataSource:
    """One split of one data set.

    Args:
        path: a hub dataset id, a local ``.parquet``/``.json``/``.jsonl``/``.csv`` file, a folder written
            by ``save_to_disk``, or an image folder with a ``metadata.jsonl``/``metadata.csv``.
        split: split name (hub datasets, ``DatasetDict`` folders, image folders).
        name: hub dataset configuration.
        max_samples: keep only the first N examples.
        image_root: folder relative image paths are resolved against (default: the data file's folder).
            Image paths must stay inside it: ``../`` or absolute paths elsewhere are counted skips.
        label: short name used in logs and metric names (default: from the path and split).
        columns: column names.
        allow_outside_image_root: accept image paths outside ``image_root``.
    """

    path: str
    split: str = "train"
    name: str | None = None
    max_samples: int | None = None
    image_root: str | None = None
    label: str | None = None
    columns: Columns = field(default_factory=Columns)
    allow_outside_image_root: bool = False

    def __post_init__(self) -> None:
        if not str(self.path or "").strip():
            raise ValueError("data source: path is empty")
        if self.max_samples is not None and (not isinstance(self.max_samples, int) or self.max_samples < 1):
            raise ValueError(
                f"data source {self.path!r}: max_samples must be >= 1 or null, got {self.max_samples!r}"
            )
        if isinstance(self.columns, dict):
            self.columns = Columns(**self.columns)

    @property
    def display_name(self) -> str:
        """Label used in logs and metric names."""
        return self.label or f"{Path(self.path.rstrip('/')).stem}-{self.split}"

    def resolved_image_root(self) -> Path:
        """Folder relative image paths are resolved against."""
        if self.image_root:
            return Path(self.image_root).expanduser()
        path = Path(self.path).expanduser()
        return path if path.is_dir() else path.parent


def looks_local(name: str) -> bool:
    """Whether a data source name is a local path rather than a hub id (``owner/name``).

    Hub ids have at most one slash and no data-file suffix; ``mydata/train.parquet`` is a file.
    """
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or path.suffix.lower() in (*_FILE_BUILDERS, ".arrow")
    )


def load_source(source: DataSource, report: SkipReport | None = None) -> datasets.Dataset:
    """Load one split as a ``datasets.Dataset`` (images left undecoded: every example is checked later).

    Args:
        source: what to load.
        report: where lines of a json/jsonl/csv file that are not valid UTF-8 are counted as skips (each
            naming the file and line); without one they are logged.

    Raises:
        FileNotFoundError: a local path that does not exist, or a split the folder lacks.
        ValueError: a file type ``datasets`` cannot read, an empty file, or undecodable text where no line
            can be skipped (a one-document ``.json`` file, a csv header).
    """
    path = Path(source.path).expanduser()
    if path.is_dir():
        dataset = _load_folder(path, source)
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{source.path}: cannot read {path.suffix!r} files; use one of {sorted(_FILE_BUILDERS)}"
            )
        readable = path if builder == "parquet" else _without_undecodable_lines(path, builder, source, report)
        if builder != "parquet" and not readable.read_bytes().strip():
            raise ValueError(f"data source {source.path!r} is empty: the file holds no examples")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(readable), split="train")
        except StopIteration:  # what the json builder raises on a file without a single record
            raise ValueError(f"data source {source.path!r} holds no examples") from None
    elif looks_local(source.path):
        raise FileNotFoundError(
            f"data source {source.path!r} does not exist (no file or folder {str(path.absolute())!r})"
        )
    else:
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    if source.max_samples is not None:
        dataset = dataset.select(range(min(source.max_samples, len(dataset))))
    return _undecoded_images(dataset)


def _without_undecodable_lines(
    path: Path, builder: str, source: DataSource, report: SkipReport | None
) -> Path:
    """``path``, or a copy of it without the lines that are not UTF-8 (each one counted in ``report``)."""
    lines = path.read_bytes().splitlines(keepends=True)
    bad = []
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as error:
            bad.append((number, error))
    if not bad:
        return path
    first = next((line.strip() for line in lines if line.strip()), b"")
    one_document = builder == "json" and path.suffix.lower() == ".json" and not _is_json_object(first)
    header_broken = builder == "csv" and bad[0][0] == 1
    if one_document or header_broken:
        number, error = bad[0]
        what = "the csv header" if header_broken else "a one-document .json file (no line can be skipped)"
        raise ValueError(f"{path}: line {number} is not valid UTF-8 ({error}) in {what}")
    from datamodules.examples import SkipReport

    report = report if report is not None else SkipReport(source=source.display_name)
    for number, error in bad:
        report.total += 1
        report.add(
            "undecodable text",
            _line_id(lines[number - 1], source, path, number),
            f"{path} line {number} is not valid UTF-8 ({error})",
            row=None,
        )
    bad_numbers = {number for number, _ in bad}
    # A copy beside nothing the user owns; the image root stays the original file's folder.
    folder = Path(tempfile.mkdtemp(prefix="cppo-utf8-"))
    copy = folder / path.name
    copy.write_bytes(b"".join(line for number, line in enumerate(lines, 1) if number not in bad_numbers))
    return copy


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8", errors="replace")), dict)
    except ValueError:
        return False


def _line_id(line: bytes, source: DataSource, path: Path, number: int) -> str:
    """The example id on an undecodable line when it can still be read, else ``<file>:<line>``."""
    try:
        row = json.loads(line.decode("utf-8", errors="replace"))
    except ValueError:
        row = None
    if isinstance(row, dict):
        for key in (source.columns.id, *_CANDIDATES["id"]):
            if key and key in row:
                return str(row[key])
    return f"{path.name}:{number}"


def _load_folder(path: Path, source: DataSource) -> datasets.Dataset:
    if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise FileNotFoundError(f"{source.path} has splits {list(loaded)}, not {source.split!r}")
            return loaded[source.split]
        return loaded
    if any(path.glob("**/metadata.jsonl")) or any(path.glob("**/metadata.csv")):
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
        if source.split not in loaded:
            raise FileNotFoundError(
                f"image folder {source.path} has splits {list(loaded)}, not {source.split!r}"
            )
        return loaded[source.split]
    raise FileNotFoundError(
        f"{source.path} is a folder but neither a save_to_disk dataset nor an image folder with metadata.jsonl/csv"
    )


def _undecoded_images(dataset: datasets.Dataset) -> datasets.Dataset:
    """Cast image features to ``decode=False``: a corrupt image becomes a counted skip, not a crash."""
    features = dataset.features.copy()
    changed = False
    for name, feature in features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            features[name] = datasets.Image(decode=False)
            changed = True
        elif isinstance(feature, (datasets.Sequence, datasets.List)) and isinstance(
            getattr(feature, "feature", None), datasets.Image
        ):
            features[name] = datasets.List(datasets.Image(decode=False))
            changed = True
    return dataset.cast(features) if changed else dataset


def resolve_columns(dataset: datasets.Dataset, columns: Columns, source_name: str) -> dict[str, str | None]:
    """Actual column names for image, question, answer and id.

    Raises:
        ValueError: a required column is missing (the message lists the columns there are).
    """
    available = list(dataset.column_names)
    resolved: dict[str, str | None] = {}
    for role, candidates in _CANDIDATES.items():
        chosen = getattr(columns, role)
        if chosen is not None:
            if chosen not in available:
                raise ValueError(f"{source_name}: column {chosen!r} (for {role}) is not among {available}")
        else:
            chosen = next((name for name in candidates if name in available), None)
        if chosen is None and role != "id":
            raise ValueError(
                f"{source_name}: no {role} column found (tried {list(candidates)}); columns are {available}. "
                f"Set columns.{role} to the right name."
            )
        resolved[role] = chosen
    return resolved


def offline() -> bool:
    """Whether ``datasets`` is told not to reach the hub."""
    return os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false", "False")

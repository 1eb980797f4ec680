"""Data loss you can see: capped skip lines, the summary at WARNING, skipped.jsonl in the run folder, a
maximum skipped share, and the odd inputs that used to slip through or crash."""

import json
import logging
import os
import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from datamodules import DataSource, VisualQADataModule
from datamodules.examples import ExampleError, _resolve
from datamodules.sources import load_source


def write_jsonl(folder, rows, name="data.jsonl"):
    """``rows`` of (id, fields) as jsonl with a real image ``images/good.png`` by default."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), dtype=np.uint8))
    image.save(folder / "images" / "good.png")
    with open(folder / name, "w") as handle:
        for example_id, fields in rows:
            row = {
                "id": example_id,
                "image": "images/good.png",
                "question": "How many shapes?",
                "answer": "2",
            }
            handle.write(json.dumps({**row, **fields}) + "\n")
    return folder / name


def datamodule(path, model, **kwargs):
    kwargs.setdefault("batch_size", 2)
    kwargs.setdefault("shuffle", False)
    source = DataSource(path=str(path), label="d", **kwargs.pop("source", {}))
    return VisualQADataModule(train=source, processor_name_or_path=str(model), **kwargs)


def attach_run_folder(dm, tmp_path):
    """A trainer with a CSV logger, as `cppo fit` attaches one: its run folder is where skipped.jsonl goes."""
    trainer = pl.Trainer(logger=CSVLogger(tmp_path / "runs"), accelerator="cpu", enable_progress_bar=False)
    dm.trainer = trainer
    return trainer


def test_a_thousand_bad_rows_are_summarised_listed_and_stop_set_up(tiny_qwen, tmp_path, caplog):
    rows = [(f"bad-{i}", {"answer": ""}) for i in range(1000)] + [(f"good-{i}", {}) for i in range(8)]
    dm = datamodule(write_jsonl(tmp_path, rows), tiny_qwen)
    trainer = attach_run_folder(dm, tmp_path)
    with caplog.at_level(logging.INFO), pytest.raises(ValueError) as raised:
        dm.setup("fit")
    lines = [r for r in caplog.records if r.name.startswith("datamodules") and "bad-" in r.getMessage()]
    # Three lines for the reason, then the summary, at WARNING, with the count; not 1,000 lines.
    assert len(lines) == 4 and all(r.levelno == logging.WARNING for r in lines)
    assert [r.getMessage().split("'")[1] for r in lines[:3]] == ["bad-0", "bad-1", "bad-2"]
    summary = "train:d: kept 8 of 1008 examples; skipped 1000 missing answer (e.g. bad-0, bad-1, bad-2, bad-3, bad-4)"
    assert lines[3].getMessage() == summary
    message = str(raised.value)
    assert message.startswith(summary) and "99% of the examples were skipped" in message
    assert "max_skip_fraction=0.2" in message
    # Every skip, with its reason, in the run folder.
    listed = [json.loads(line) for line in open(os.path.join(trainer.log_dir, "skipped.jsonl"))]
    assert [entry["id"] for entry in listed] == [f"bad-{i}" for i in range(1000)]
    assert listed[0] == {
        "source": "train:d",
        "id": "bad-0",
        "row": 0,
        "reason": "missing answer",
        "detail": "field 'answer' is empty",
    }
    # A user who accepts the loss says so.
    relaxed = datamodule(tmp_path / "data.jsonl", tiny_qwen, max_skip_fraction=1.0)
    relaxed.setup("fit")
    assert relaxed.datasets["train"][0].ids == [f"good-{i}" for i in range(8)]


def test_image_tags_that_do_not_match_the_images_are_a_counted_skip(tiny_qwen, tmp_path):
    rows = [
        ("three-tags", {"question": "<image> <image> <image> Which picture has a circle?"}),
        ("one-tag", {"question": "<image> How many shapes?"}),
        ("numbered", {"question": "<image 1> How many shapes?"}),
        ("no-tag", {}),
    ]
    dm = datamodule(write_jsonl(tmp_path, rows), tiny_qwen, max_skip_fraction=0.5)
    dm.setup("fit")
    report = dm.skip_reports[0]
    assert report.counts == {"image tags do not match images": 1}
    assert report.entries[0]["id"] == "three-tags"
    assert report.entries[0]["detail"] == "the question has 3 <image> tags but the example has 1 image"
    assert dm.datasets["train"][0].ids == ["one-tag", "numbered", "no-tag"]
    strict = datamodule(tmp_path / "data.jsonl", tiny_qwen, strict=True)
    with pytest.raises(ValueError, match=r"example 'three-tags' \(row 0\): image tags do not match images"):
        strict.setup("fit")


def test_several_different_answers_are_skipped_for_that_reason(tiny_qwen, tmp_path):
    rows = [
        ("two", {"answer": ["3", "three"]}),
        ("copies", {"answer": ["4", " 4"]}),  # one answer written twice: kept
        ("one", {"answer": ["5"]}),
        ("plain", {}),
    ]
    dm = datamodule(write_jsonl(tmp_path, rows), tiny_qwen, max_skip_fraction=0.5)
    dm.setup("fit")
    (entry,) = dm.skip_reports[0].entries
    assert entry["id"] == "two" and entry["reason"] == "several answers"
    assert "field 'answer' holds 2 different answers ['3', 'three']" in entry["detail"]
    assert [dm.datasets["train"][0][i].answer for i in range(3)] == ["4", "5", "2"]


def test_undecodable_lines_are_counted_skips_naming_the_file_and_line(tiny_qwen, tmp_path):
    path = write_jsonl(tmp_path, [(f"q{i}", {}) for i in range(5)])
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"How many", b"How \xff\xfe many")  # not UTF-8
    path.write_bytes(b"".join(lines))
    dm = datamodule(path, tiny_qwen, batch_size=2)
    dm.setup("fit")
    (entry,) = dm.skip_reports[0].entries
    assert entry["id"] == "q2" and entry["reason"] == "undecodable text"
    assert entry["detail"].startswith(f"{path} line 3 is not valid UTF-8")
    assert dm.skip_reports[0].total == 5 and dm.datasets["train"][0].ids == ["q0", "q1", "q3", "q4"]


def test_an_image_deleted_after_set_up_is_skipped_with_its_id_not_a_crash(tiny_qwen, tmp_path, caplog):
    rows = [(f"q{i}", {"image": f"images/{i}.png"}) for i in range(4)]
    path = write_jsonl(tmp_path, rows)
    for i in range(4):
        shutil.copy(tmp_path / "images" / "good.png", tmp_path / "images" / f"{i}.png")
    dm = datamodule(path, tiny_qwen, batch_size=2, max_skip_fraction=0.25)
    attach_run_folder(dm, tmp_path)
    dm.setup("fit")
    (tmp_path / "images" / "1.png").unlink()  # after the checks, before training reads it
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    batches = list(loader)
    # The batch keeps its size: q1 is replaced by the next readable example.
    assert [batch.ids for batch in batches] == [["q0", "q2"], ["q2", "q3"]]
    assert dm.load_failures == {"train:d": {"q1": "unreadable image"}}
    assert "example 'q1' (row 1) cannot be loaded any more" in caplog.text
    (entry,) = [json.loads(line) for line in open(os.path.join(dm.trainer.log_dir, "skipped.jsonl"))]
    assert entry["id"] == "q1" and entry["when"] == "loading, epoch 0" and "does not exist" in entry["detail"]
    # More losses than max_skip_fraction allows (1 of 4): loading stops, naming the source.
    (tmp_path / "images" / "2.png").unlink()
    with pytest.raises(RuntimeError, match=r"train:d: 2 of 4 examples became unreadable after set-up"):
        list(dm.train_dataloader())


def test_image_paths_stay_inside_image_root_unless_allowed(tiny_qwen, tmp_path):
    data = tmp_path / "data"
    secret = tmp_path / "elsewhere.png"
    Image.new("RGB", (56, 56)).save(secret)
    rows = [("escape", {"image": "../elsewhere.png"}), ("a", {}), ("b", {}), ("c", {})]
    dm = datamodule(write_jsonl(data, rows), tiny_qwen, max_skip_fraction=0.25)
    dm.setup("fit")
    (entry,) = dm.skip_reports[0].entries
    assert entry["reason"] == "image outside image_root" and str(secret) in entry["detail"]
    allowed = datamodule(data / "data.jsonl", tiny_qwen, source={"allow_outside_image_root": True})
    allowed.setup("fit")
    assert allowed.datasets["train"][0].ids == ["escape", "a", "b", "c"]


@given(st.lists(st.sampled_from(["..", ".", "a", "b", "c.png"]), min_size=1, max_size=6))
def test_a_relative_path_is_accepted_exactly_when_it_stays_inside_the_root(parts):
    root = "/data/images"
    inside, depth = True, 0
    for part in parts:  # by hand: ".." leaves the root once it climbs above where it started
        depth += {"..": -1, ".": 0}.get(part, 1)
        inside &= depth >= 0
    relative = "/".join(parts)
    try:
        _resolve(relative, Path(root))
    except ExampleError as error:
        assert error.reason == ("image outside image_root" if not inside else "unreadable image")
    else:  # pragma: no cover - nothing exists under /data/images
        raise AssertionError("a missing file was accepted")


def test_a_missing_local_file_with_one_slash_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data source 'mydata/train.parquet' does not exist"):
        load_source(DataSource(path="mydata/train.parquet"))

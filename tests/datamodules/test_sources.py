"""Data sources: local files, save_to_disk folders, image folders, ViRL39K-style schemas, column errors.

Every source is built in ``tmp_path`` with ``datasets``/PIL and read through ``VisualQADataModule`` as a user
would; images are 56 x 56 (on the tiny Qwen's 28 px grid and at its 3136-pixel minimum, so they reach the
batch without resizing and the pixels can be compared exactly).
"""

import csv
import json

import datasets
import numpy as np
import pytest
from PIL import Image

from cppo_lightning.batch import ORIGINAL
from datamodules import Columns, DataSource, VisualQADataModule
from datamodules.sources import load_source, resolve_columns

SIDE = 56


def pixels(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def rows(count, start=0):
    return [
        {"id": f"ex-{i}", "question": f"How many circles in {i}?", "answer": str(i)}
        for i in range(start, start + count)
    ]


def first_batch(source, model, size):
    dm = VisualQADataModule(
        train=source, processor_name_or_path=str(model), batch_size=size, shuffle=False, views=["original"]
    )
    dm.setup("fit")
    assert dm.skip_reports[0].skipped == 0, dm.skip_reports[0].summary()
    (batch,) = list(dm.train_dataloader())
    return batch


def assert_examples(batch, count, start=0):
    assert batch.ids == [f"ex-{i}" for i in range(start, start + count)]
    assert batch.answers == [str(i) for i in range(start, start + count)]
    assert batch.questions == [f"How many circles in {i}?" for i in range(start, start + count)]
    for row, image in enumerate(batch.images[ORIGINAL]):
        np.testing.assert_array_equal(image, pixels(start + row))


def embedded(count, start=0):
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    data = rows(count, start)
    for row, example in enumerate(data):
        example["image"] = Image.fromarray(pixels(start + row))
    return datasets.Dataset.from_list(data, features=features)


def test_parquet_with_embedded_images(tiny_qwen, tmp_path):
    embedded(3).to_parquet(str(tmp_path / "train.parquet"))
    assert_examples(first_batch(DataSource(path=str(tmp_path / "train.parquet")), tiny_qwen, 3), 3)


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_text_files_with_image_paths_relative_to_the_file(tiny_qwen, tmp_path, monkeypatch, suffix):
    folder = tmp_path / "data"
    (folder / "imgs").mkdir(parents=True)
    data = rows(3)
    for row, example in enumerate(data):
        Image.fromarray(pixels(row)).save(folder / "imgs" / f"{row}.png")
        example["image"] = f"imgs/{row}.png"
    path = folder / f"annotations.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(example) + "\n" for example in data))
    else:
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    monkeypatch.chdir(tmp_path)  # not the file's folder: paths resolve against the file, not the cwd
    assert_examples(first_batch(DataSource(path=str(path)), tiny_qwen, 3), 3)


def test_save_to_disk_folder_with_splits(tiny_qwen, tmp_path):
    folder = str(tmp_path / "dd")
    datasets.DatasetDict({"train": embedded(4), "validation": embedded(2, start=10)}).save_to_disk(folder)
    assert_examples(first_batch(DataSource(path=folder), tiny_qwen, 4), 4)
    assert_examples(first_batch(DataSource(path=folder, split="validation"), tiny_qwen, 2), 2, start=10)
    with pytest.raises(FileNotFoundError, match=r"has splits \['train', 'validation'\], not 'test'"):
        load_source(DataSource(path=str(tmp_path / "dd"), split="test"))
    # A single saved Dataset (no splits) loads as it is; max_samples keeps the first rows.
    embedded(3).save_to_disk(str(tmp_path / "single"))
    assert_examples(first_batch(DataSource(path=str(tmp_path / "single"), max_samples=2), tiny_qwen, 2), 2)


def test_image_folder_with_metadata(tiny_qwen, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as handle:
        for row, example in enumerate(rows(3)):
            Image.fromarray(pixels(row)).save(folder / f"img{row}.png")
            handle.write(json.dumps({"file_name": f"img{row}.png", **example}) + "\n")
    assert_examples(first_batch(DataSource(path=str(folder)), tiny_qwen, 3), 3)


def test_a_folder_that_is_no_dataset_and_unknown_files_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a save_to_disk dataset nor an image folder"):
        load_source(DataSource(path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(DataSource(path=str(tmp_path / "missing.parquet")))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"cannot read '\.txt' files"):
        load_source(DataSource(path=str(tmp_path / "notes.txt")))


# ------------------------------------------------------------------------------------------------
# ViRL39K-style schema, detected without configuration
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("images", ["paths", "embedded"])
def test_virl39k_schema_works_without_configuring_columns(tiny_qwen, tmp_path, images):
    # ViRL39K: `question` with an <image> placeholder, `answer` as \boxed{}, `image` a list holding one
    # image (a path relative to the parquet file in the release), `qid`, and extra columns.
    (tmp_path / "images").mkdir()
    data = {"question": [], "answer": [], "image": [], "qid": [], "category": [], "PassRate_32BTrained": []}
    for row in range(2):
        Image.fromarray(pixels(row)).save(tmp_path / "images" / f"{row}.png")
        data["question"].append(f"<image>How many circles in {row}?")
        data["answer"].append(f"\\boxed{{{row}}}")
        data["image"].append([f"images/{row}.png"] if images == "paths" else [Image.fromarray(pixels(row))])
        data["qid"].append(f"virl-{row}")
        data["category"].append("counting")
        data["PassRate_32BTrained"].append(0.25 * row)
    features = None
    if images == "embedded":
        features = datasets.Features(
            {
                "question": datasets.Value("string"),
                "answer": datasets.Value("string"),
                "image": datasets.List(datasets.Image()),
                "qid": datasets.Value("string"),
                "category": datasets.Value("string"),
                "PassRate_32BTrained": datasets.Value("float64"),
            }
        )
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / "39Krelease.parquet"))

    batch = first_batch(DataSource(path=str(tmp_path / "39Krelease.parquet")), tiny_qwen, 2)
    assert batch.ids == ["virl-0", "virl-1"]
    assert batch.answers == ["\\boxed{0}", "\\boxed{1}"]  # the grader takes the last \boxed{}
    # The placeholder is gone: the chat template places the one image, so the prompt has one image span.
    assert batch.questions == ["How many circles in 0?", "How many circles in 1?"]
    for row in range(2):
        np.testing.assert_array_equal(batch.images[ORIGINAL][row], pixels(row))
        expected = {"qid": f"virl-{row}", "category": "counting", "PassRate_32BTrained": 0.25 * row}
        assert batch.metadata[row] == expected
    processor_vocab = first_vocab(tiny_qwen)
    for ids in batch.input_ids.tolist():
        assert ids.count(processor_vocab["<|vision_start|>"]) == 1
        assert ids.count(processor_vocab["<|image_pad|>"]) == (SIDE // 28) ** 2  # 2 x 2 merged patches


def first_vocab(model):
    from cppo_lightning.models import load_processor

    return load_processor(str(model)).tokenizer.get_vocab()


def test_r1v_style_names_are_detected_too():
    dataset = datasets.Dataset.from_dict({"images": [[]], "problem": ["q"], "solution": ["a"], "pid": ["1"]})
    expected = {"image": "images", "question": "problem", "answer": "solution", "id": "pid"}
    assert resolve_columns(dataset, Columns(), "r1v") == expected
    # No id column at all is fine: ids become <source>-<row>.
    dataset = dataset.remove_columns("pid")
    assert resolve_columns(dataset, Columns(), "r1v")["id"] is None


def test_a_missing_required_column_lists_the_columns_there_are(tiny_qwen, tmp_path):
    embedded(2).remove_columns("answer").to_parquet(str(tmp_path / "noanswer.parquet"))
    source = DataSource(path=str(tmp_path / "noanswer.parquet"))
    dm = VisualQADataModule(train=source, processor_name_or_path=str(tiny_qwen))
    with pytest.raises(ValueError) as raised:
        dm.setup("fit")
    message = str(raised.value)
    assert "noanswer-train: no answer column found" in message
    assert "columns are ['id', 'question', 'image']" in message and "Set columns.answer" in message

    # A configured name that is not there says so, with the same list.
    source = DataSource(path=str(tmp_path / "noanswer.parquet"), columns=Columns(answer="label"))
    dm = VisualQADataModule(train=source, processor_name_or_path=str(tiny_qwen))
    expected = r"column 'label' \(for answer\) is not among \['id', 'question', 'image'\]"
    with pytest.raises(ValueError, match=expected):
        dm.setup("fit")


def test_configured_columns_override_detection(tiny_qwen, tmp_path):
    data = rows(2)
    for row, example in enumerate(data):
        Image.fromarray(pixels(row)).save(tmp_path / f"{row}.png")
        # Decoys under the detected names: a wrong pick would skip (no such image) or fail the comparison.
        example.update(picture=f"{row}.png", prompt=example.pop("question"), gold=example.pop("answer"))
        example.update(key=example.pop("id"), image="missing.png", answer="decoy")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(example) + "\n" for example in data))
    columns = Columns(image="picture", question="prompt", answer="gold", id="key")
    assert_examples(first_batch(DataSource(path=str(tmp_path / "d.jsonl"), columns=columns), tiny_qwen, 2), 2)

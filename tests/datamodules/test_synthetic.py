"""The synthetic perception task: determinism, split hygiene, answers that follow from the pixels, export."""

import dataclasses
import json
import re
from collections import Counter

import cv2
import datasets
import numpy as np
import pytest
from jsonargparse import ArgumentParser

from datamodules.synthetic import (
    BACKGROUNDS,
    COLOURS,
    FAMILIES,
    FEATURES,
    SHAPE_KINDS,
    SyntheticTaskConfig,
    export_synthetic_dataset,
    generate_example,
    generate_split,
    split_of_layout,
    to_hf_dataset,
)

DEFAULT = SyntheticTaskConfig()


def pixels(image):
    return np.asarray(image.convert("RGB"))


def fingerprint(example):
    return (pixels(example["image"]).tobytes(), example["question"])


# ------------------------------------------------------------------------------------------------
# Determinism and ids
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_examples_other_seed_other_examples():
    first = generate_split(DEFAULT, "train", 25, seed=3)
    second = generate_split(DEFAULT, "train", 25, seed=3)
    for a, b in zip(first, second, strict=True):
        for key in ("id", "question", "answer", "family"):
            assert a[key] == b[key]
        np.testing.assert_array_equal(pixels(a["image"]), pixels(b["image"]))
    other = generate_split(DEFAULT, "train", 25, seed=4)
    assert sum(fingerprint(a) != fingerprint(b) for a, b in zip(first, other)) >= 24


def test_ids_and_columns():
    examples = generate_split(DEFAULT, "validation", 5, seed=0)
    assert [e["id"] for e in examples] == [f"synthetic-validation-{i:06d}" for i in range(5)]
    for e in examples:
        assert set(e) == {"id", "image", "question", "answer", "family"}
        assert e["image"].mode == "RGB" and e["image"].size == (224, 224)


def test_an_example_does_not_depend_on_the_others():
    # Example i is a function of (config, split, i, seed): a DataModule may generate any slice lazily.
    examples = generate_split(DEFAULT, "test", 12, seed=5)
    single = generate_example(DEFAULT, "test", 11, seed=5)
    for key in ("id", "question", "answer", "family"):
        assert getattr(single, key) == examples[11][key]
    np.testing.assert_array_equal(pixels(single.image), pixels(examples[11]["image"]))


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def test_splits_never_share_an_image_even_when_the_layout_space_is_tiny():
    # 32 px images with one 16 px shape: x, y in 9..22 (14 values each), 2 kinds, 2 colours, 1 background:
    # 14 * 14 * 4 = 784 layouts. 150 examples per split would share ~150 * 150 / 784 ~ 29 images between two
    # independently drawn splits; the layout hash must bring that to 0.
    tiny = SyntheticTaskConfig(
        image_size=32,
        min_shapes=1,
        max_shapes=1,
        shape_size_range=(0.5, 0.5),
        clutter=0,
        families=("count_colour", "presence"),
        shape_kinds=("circle", "square"),
        colours=("red", "blue"),
        backgrounds=("white",),
    )
    splits = {split: generate_split(tiny, split, 150, seed=0) for split in ("train", "validation", "test")}
    images = {split: {pixels(e["image"]).tobytes() for e in examples} for split, examples in splits.items()}
    # The space really is small: images repeat within a split.
    assert len(images["train"]) < 150
    assert not images["train"] & images["validation"]
    assert not images["train"] & images["test"]
    assert not images["validation"] & images["test"]
    # Also across seeds: the split of a layout does not depend on the seed.
    other_seed = {pixels(e["image"]).tobytes() for e in generate_split(tiny, "validation", 150, seed=99)}
    assert not images["train"] & other_seed


def test_default_splits_share_no_image_question_pair():
    pairs = {
        split: {fingerprint(e) for e in generate_split(DEFAULT, split, 150, seed=1)}
        for split in ("train", "validation", "test")
    }
    assert not pairs["train"] & pairs["validation"] and not pairs["train"] & pairs["test"]
    assert not pairs["validation"] & pairs["test"]


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        generate_split(DEFAULT, "val", 1, seed=0)


# ------------------------------------------------------------------------------------------------
# Answers
# ------------------------------------------------------------------------------------------------

RELATIONS = {  # relation -> (axis, whether the first shape has the smaller coordinate)
    "to the left of": (0, True),
    "to the right of": (0, False),
    "above": (1, True),
    "below": (1, False),
}


def answer_from_scene(question, scene):
    """The answer re-derived from the scene description by parsing the question (not using the generator)."""
    shapes = scene.shapes
    if m := re.fullmatch(r"How many (\w+) shapes are in the image\?", question):
        return str(sum(s.colour == m[1] for s in shapes))
    if m := re.fullmatch(r"How many (\w+)s are in the image\?", question):
        return str(sum(s.kind == m[1] for s in shapes))
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        matches = [s for s in shapes if s.kind == m[1]]
        assert len(matches) == 1, "colour_of asked about a kind that is not unique"
        return matches[0].colour
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", question):
        return "yes" if any((s.colour, s.kind) == (m[1], m[2]) for s in shapes) else "no"
    relative = r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?"
    if m := re.fullmatch(relative, question):
        (a,) = [s for s in shapes if (s.colour, s.kind) == (m[1], m[2])]  # unique by construction
        (b,) = [s for s in shapes if (s.colour, s.kind) == (m[4], m[5])]
        axis, a_first = RELATIONS[m[3]]
        ca, cb = (a.x, b.x) if axis == 0 else (a.y, b.y)
        # Unambiguous: the two shapes' extents along the axis do not overlap.
        assert abs(ca - cb) > a.radius + b.radius
        return "yes" if (ca < cb) == a_first else "no"
    raise AssertionError(f"unexpected question: {question}")


def test_answers_follow_from_the_scene():
    families = Counter()
    for i in range(300):
        example = generate_example(DEFAULT, "train", i, seed=2)
        assert example.answer == answer_from_scene(example.question, example.scene), example.question
        families[example.family] += 1
    assert set(families) == set(FAMILIES)


def test_scene_description_matches_the_pixels():
    # No anti-aliasing and grey clutter: the pixels of one palette colour are exactly that colour's shapes,
    # and shapes never touch, so each shape is one connected blob.
    for i in range(40):
        example = generate_example(DEFAULT, "validation", i, seed=0)
        image = pixels(example.image)
        for name, rgb in COLOURS.items():
            mask = (image == rgb).all(axis=-1).astype(np.uint8)
            count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
            blobs = int((stats[1:, cv2.CC_STAT_AREA] >= 20).sum())
            assert blobs == sum(s.colour == name for s in example.scene.shapes), (example.id, name)
        for shape in example.scene.shapes:
            assert tuple(image[shape.y, shape.x]) == COLOURS[shape.colour]  # every kind covers its centre


def test_yes_no_answers_are_balanced():
    config = SyntheticTaskConfig(families=("relative_position", "presence"))
    answers = Counter()
    for e in generate_split(config, "train", 1600, seed=0):
        answers[e["family"], e["answer"]] += 1
    for family in config.families:
        n = answers[family, "yes"] + answers[family, "no"]
        assert n > 700
        # The answer is drawn first with probability 1/2: Binomial(n, 1/2), 4.5 sd = 2.25 * sqrt(n) ~ 64 for
        # n = 800, i.e. +-8 %; a generator answering "yes" 60 % of the time is 80 off and fails.
        assert abs(answers[family, "yes"] - n / 2) < 2.25 * n**0.5, answers


def test_answer_formats():
    for e in generate_split(DEFAULT, "test", 200, seed=0):
        if e["family"].startswith("count_"):
            assert re.fullmatch(r"[0-9]+", e["answer"])
        elif e["family"] == "colour_of":
            assert e["answer"] in COLOURS
        else:
            assert e["answer"] in ("yes", "no")


def test_family_weights_and_knobs_are_honoured():
    config = SyntheticTaskConfig(
        families=("count_colour", "count_kind", "presence"),
        family_weights=(3.0, 1.0, 0.0),
        min_shapes=3,
        max_shapes=3,
        shape_kinds=("circle", "star"),
        colours=("red", "green"),
        backgrounds=("dark grey",),
        image_size=96,
        clutter=0,
    )
    counts = Counter()
    for i in range(200):
        example = generate_example(config, "train", i, seed=0)
        counts[example.family] += 1
        assert len(example.scene.shapes) == 3 and example.image.size == (96, 96)
        assert {s.kind for s in example.scene.shapes} <= set(config.shape_kinds)
        assert {s.colour for s in example.scene.shapes} <= set(config.colours)
        assert tuple(pixels(example.image)[0, 0]) == BACKGROUNDS["dark grey"] and not example.scene.clutter
    assert counts["presence"] == 0
    # count_colour ~ Binomial(200, 3/4): mean 150, sd 6.1.
    assert 120 < counts["count_colour"] < 180, counts


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"families": ("count_everything",)}, "families"),
        ({"min_shapes": 4, "max_shapes": 2}, "min_shapes"),
        ({"shape_kinds": ("circle", "hexagon")}, "shape_kinds"),
        ({"family_weights": (1.0, 2.0)}, "family_weights"),
        ({"min_shapes": 1, "max_shapes": 1}, "relative_position"),
        ({"max_shapes": 30, "shape_size_range": (0.2, 0.3)}, "do not fit"),
    ],
)
def test_invalid_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTaskConfig(**kwargs)


def test_config_from_yaml():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--task", type=SyntheticTaskConfig)
    yaml = "task:\n  image_size: 128\n  families: [presence, count_kind]\n  family_weights: [1, 2]\n"
    config = parser.instantiate(parser.parse_string(yaml)).task
    assert config == SyntheticTaskConfig(
        image_size=128, families=("presence", "count_kind"), family_weights=(1.0, 2.0)
    )


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def test_export_round_trips_through_load_from_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    config = SyntheticTaskConfig(image_size=64, shape_size_range=(0.15, 0.25), max_shapes=4)
    sizes = {"train": 10, "validation": 4, "test": 3}
    saved = export_synthetic_dataset(tmp_path / "synthetic", config, sizes, seed=7)
    loaded = datasets.load_from_disk(str(tmp_path / "synthetic"))
    assert isinstance(loaded, datasets.DatasetDict) and set(loaded) == set(sizes)
    for split, n in sizes.items():
        assert loaded[split].features == FEATURES and len(loaded[split]) == n == len(saved[split])
        for row, example in zip(loaded[split], generate_split(config, split, n, seed=7), strict=True):
            assert (row["id"], row["question"], row["answer"], row["family"]) == (
                example["id"],
                example["question"],
                example["answer"],
                example["family"],
            )
            np.testing.assert_array_equal(pixels(row["image"]), pixels(example["image"]))
    provenance = json.loads((tmp_path / "synthetic" / "synthetic_task.json").read_text())
    assert provenance["sizes"] == sizes and provenance["seed"] == 7
    assert provenance["config"]["image_size"] == 64


def test_to_hf_dataset_has_the_declared_features():
    dataset = to_hf_dataset(generate_split(DEFAULT, "train", 3, seed=0))
    assert dataset.features == FEATURES
    assert dataset.column_names == ["id", "image", "question", "answer", "family"]


def test_layout_split_ignores_clutter():
    example = generate_example(DEFAULT, "test", 0, seed=0)
    assert example.scene.clutter and split_of_layout(example.scene) == "test"
    assert split_of_layout(dataclasses.replace(example.scene, clutter=())) == "test"


def test_kinds_are_all_drawn():
    scenes = [generate_example(DEFAULT, "train", i, seed=0).scene for i in range(100)]
    kinds = Counter(shape.kind for scene in scenes for shape in scene.shapes)
    assert set(kinds) == set(SHAPE_KINDS)

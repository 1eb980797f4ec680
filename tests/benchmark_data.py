"""Small local copies of the paper's seven benchmarks, each in its hub schema and stored as it is read.

Every builder writes a few rows with images generated here, in the columns, types and value conventions
of the benchmark's dataset card (see configs/eval/<benchmark>.yaml), and returns the path that replaces
the hub id in the shipped config. ``EXPECTED`` says, per benchmark, how many rows survive and which rows
are multiple choice with known options (what a grader that only looks at ``choices`` would score).
"""

import io
import json
from pathlib import Path

import datasets
import numpy as np
import yaml
from PIL import Image

from helpers import ROOT

EVAL_CONFIGS = ROOT / "configs" / "eval"


def image(seed, size=(56, 84)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def png_bytes(seed):
    buffer = io.BytesIO()
    image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def mathvista(folder: Path) -> str:
    """AI4Math/MathVista testmini: parquet; `choices` a list (None for free form), answer = option text."""
    rows = [
        # pid, question, choices, answer, question_type, answer_type
        ("1", "What is the length of the red bar?", ["1.8", "2.0", "2.2"], "2.0", "multi_choice", "text"),
        ("2", "How many objects are left?", None, "3", "free_form", "integer"),
        ("3", "Which color is the largest area?", ["red", "blue"], "blue", "multi_choice", "text"),
        ("4", "Which bar is taller?", None, "A", "multi_choice", "text"),  # bad: no choices -> counted skip
    ]
    data = {
        "pid": [r[0] for r in rows],
        "question": [r[1] for r in rows],
        "image": [f"images/{r[0]}.jpg" for r in rows],
        "decoded_image": [image(i) for i in range(len(rows))],
        "choices": [r[2] for r in rows],
        "unit": [None] * len(rows),
        "precision": [None, None, None, None],
        "answer": [r[3] for r in rows],
        "question_type": [r[4] for r in rows],
        "answer_type": [r[5] for r in rows],
        "metadata": [{"category": "math-targeted-vqa", "context": "bar chart", "grade": "daily life"}]
        * len(rows),
        "query": [
            f"Hint: Please answer the question.\nQuestion: {r[1]}"
            + ("\nChoices:\n" + "\n".join(f"({'ABC'[i]}) {c}" for i, c in enumerate(r[2])) if r[2] else "")
            for r in rows
        ],
    }
    features = datasets.Features(
        {
            "pid": datasets.Value("string"),
            "question": datasets.Value("string"),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "choices": datasets.List(datasets.Value("string")),
            "unit": datasets.Value("string"),
            "precision": datasets.Value("float64"),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "answer_type": datasets.Value("string"),
            "metadata": {
                "category": datasets.Value("string"),
                "context": datasets.Value("string"),
                "grade": datasets.Value("string"),
            },
            "query": datasets.Value("string"),
        }
    )
    path = folder / "mathvista" / "testmini-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return str(path)


def dynamath(folder: Path) -> str:
    """DynaMath/DynaMath_Sample: a save_to_disk DatasetDict with splits sample_variant1 and 2."""

    def split(variant):
        return datasets.Dataset.from_dict(
            {
                "id": [f"{variant}-1", f"{variant}-2"],
                "question": [
                    "Which function is increasing? Choices: (A) f (B) g (C) h",
                    "What is the value of f(2)?",
                ],
                "image": ["1.png", "2.png"],
                "decoded_image": [image(10 + variant), image(20 + variant)],
                "ground_truth": ["B", "4.0"],
                "answer_type": ["multiple choice", "float"],
                "subject": ["algebra", "algebra"],
                "knowledge_level": ["high school", "high school"],
            },
            features=datasets.Features(
                {
                    **{
                        name: datasets.Value("string") for name in ("id", "question", "image", "ground_truth")
                    },
                    "decoded_image": datasets.Image(),
                    **{
                        name: datasets.Value("string")
                        for name in ("answer_type", "subject", "knowledge_level")
                    },
                }
            ),
        )

    path = folder / "dynamath"
    datasets.DatasetDict({"sample_variant1": split(1), "sample_variant2": split(2)}).save_to_disk(str(path))
    return str(path)


def wemath(folder: Path) -> str:
    """We-Math/We-Math testmini: parquet; options as one "A. ...; B. ..." string, answer a letter."""
    data = {
        "ID": ["1-1", "2-1"],
        "split": ["testmini", "testmini"],
        "knowledge concept": ["Angles", "Area"],
        "question": ["What is angle x?", "What is the area of the square?"],
        "option": ["A. 30°; B. 45°; C. 60°; D. 90°; E. No correct answer", "A. 4; B. 8; C. 16"],
        "answer": ["B", "C"],
        "key": ["1", "2"],
        "question number": [1, 2],
        "knowledge concept description": ["...", "..."],
        "image_path": [{"bytes": png_bytes(30), "path": "1.png"}, {"bytes": png_bytes(31), "path": "2.png"}],
    }
    features = datasets.Features(
        {
            **{
                name: datasets.Value("string")
                for name in ("ID", "split", "knowledge concept", "question", "option", "answer", "key")
            },
            "question number": datasets.Value("int64"),
            "knowledge concept description": datasets.Value("string"),
            "image_path": datasets.Image(),
        }
    )
    path = folder / "wemath" / "testmini-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return str(path)


def mathvision(folder: Path) -> str:
    """MathLLMs/MathVision testmini: parquet; `options` a list, empty for free-form problems."""
    data = {
        "id": ["1", "2", "3"],
        "question": [
            "<image1> Which shape has 5 sides?",
            "<image1> How many dots?",
            "<image1> Which is red?",
        ],
        "options": [["A", "B", "C", "D", "E"], [], ["the circle", "the square"]],
        "image": ["images/1.jpg", "images/2.jpg", "images/3.jpg"],
        "decoded_image": [image(40), image(41), image(42)],
        "answer": ["C", "7", "A"],
        "solution": [None, None, None],
        "level": [2, 1, 1],
        "subject": ["metric geometry - area", "counting", "logic"],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "question": datasets.Value("string"),
            "options": datasets.List(datasets.Value("string")),
            "image": datasets.Value("string"),
            "decoded_image": datasets.Image(),
            "answer": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "level": datasets.Value("int64"),
            "subject": datasets.Value("string"),
        }
    )
    path = folder / "mathvision" / "testmini-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return str(path)


def mathverse(folder: Path) -> str:
    """AI4Math/MathVerse (config testmini): a save_to_disk DatasetDict with the split testmini."""
    question = "As shown in the figure, find angle B.\nChoices:\nA:40°\nB:50°\nC:60°\nD:70°"
    data = {
        "sample_index": ["1", "2", "3"],
        "problem_index": ["1", "1", "2"],
        "problem_version": ["Text Dominant", "Vision Only", "Text Lite"],
        "question": [question, "", "Find the length of AB."],
        "image": [image(50), image(51), image(52)],
        "answer": ["B", "B", "5"],
        "question_type": ["multi-choice", "multi-choice", "free-form"],
        "metadata": [{"split": "testmini", "source": "GeoQA", "subject": "Plane Geometry"}] * 3,
        "query_wo": ["Please directly answer. " + question, "Answer the question in the image.", "Find AB."],
        "query_cot": [
            "Please first conduct reasoning, and then answer the question and provide the correct option "
            "letter, e.g., A, B, C, D, at the end.\nQuestion: " + question,
            "According to the question shown in the image, please first conduct reasoning, and then answer "
            "the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
            "Please first conduct reasoning, and then answer the question.\nQuestion: Find the length of AB.",
        ],
        "question_for_eval": [question, "", "Find the length of AB."],
    }
    features = datasets.Features(
        {
            **{
                name: datasets.Value("string")
                for name in ("sample_index", "problem_index", "problem_version", "question")
            },
            "image": datasets.Image(),
            "answer": datasets.Value("string"),
            "question_type": datasets.Value("string"),
            "metadata": {name: datasets.Value("string") for name in ("split", "source", "subject")},
            **{name: datasets.Value("string") for name in ("query_wo", "query_cot", "question_for_eval")},
        }
    )
    path = folder / "mathverse"
    datasets.DatasetDict({"testmini": datasets.Dataset.from_dict(data, features=features)}).save_to_disk(
        str(path)
    )
    return str(path)


def logicvista(folder: Path) -> str:
    """lscpku/LogicVista test: JSON lines with image files beside them (a local copy as users keep one)."""
    path = folder / "logicvista"
    path.mkdir()
    rows = [
        {
            "id": "lv-1",
            "question": "Which comes next? A. a star B. a moon C. a sun D. a cloud",
            "answer": "C",
        },
        {
            "id": "lv-2",
            "question": "Which two figures are identical? Choose from A, B, C, D.",
            "answer": "A, C",
        },
    ]
    with open(path / "test.jsonl", "w") as handle:
        for index, row in enumerate(rows):
            image(60 + index).save(path / f"{row['id']}.png")
            extra = {"reasoning": "...", "skill": ["inductive"], "imagesource": "web", "liscenced": True}
            handle.write(json.dumps({**row, "image": f"{row['id']}.png", **extra}) + "\n")
    return str(path / "test.jsonl")


def mmmu_pro_vision(folder: Path) -> str:
    """MMMU/MMMU_Pro (config vision) test: parquet; options a string repr of a list, no question column."""
    data = {
        "id": ["test_Art_1", "test_Math_2"],
        "image": [image(70, (84, 112)), image(71, (84, 112))],
        "options": ["['$6', '$7', '$8', '$9']", "['x = 1', 'x = 2', 'x = 3']"],
        "answer": ["B", "C"],
        "subject": ["Art", "Math"],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "options": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "subject": datasets.Value("string"),
        }
    )
    path = folder / "mmmu_pro_vision" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return str(path)


BUILDERS = {
    "mathvista": mathvista,
    "dynamath": dynamath,
    "wemath": wemath,
    "mathvision": mathvision,
    "mathverse": mathverse,
    "logicvista": logicvista,
    "mmmu_pro_vision": mmmu_pro_vision,
}

# Per config: (benchmark name, questions kept, skipped, questions that are multiple choice with options).
EXPECTED = {
    "mathvista": ("MathVista", 3, 1, 2),
    "dynamath": ("DynaMath", 2, 0, 1),
    "wemath": ("WeMath", 2, 0, 2),
    "mathvision": ("MathVision", 3, 0, 2),
    "mathverse": ("MathVerse", 3, 0, 1),  # the vision-only row has no options in its text
    "logicvista": ("LogicVista", 2, 0, 1),  # the second shows its options only in the image
    "mmmu_pro_vision": ("MMMU-Pro-V", 2, 0, 2),
}


def write_local_configs(folder: Path) -> Path:
    """The shipped configs/eval files with each hub id replaced by a local copy; returns their folder."""
    configs = folder / "configs"
    configs.mkdir()
    (configs / "protocol.yaml").write_text((EVAL_CONFIGS / "protocol.yaml").read_text())
    for stem, build in BUILDERS.items():
        config = yaml.safe_load((EVAL_CONFIGS / f"{stem}.yaml").read_text())
        (benchmark,) = config["data"]["init_args"]["benchmarks"]
        benchmark["source"]["path"] = build(folder)
        (configs / f"{stem}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return configs


def choices_grader(prompts, completions, answers, choices=None, multiple_choice=None, **columns):
    """1 for a multiple-choice question whose options reached the grader, else 0 (for exact report checks)."""
    return [
        float(bool(options) and bool(flag)) for options, flag in zip(choices, multiple_choice, strict=True)
    ]

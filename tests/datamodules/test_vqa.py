"""VisualQADataModule: views that share tokens, determinism across workers and epochs, counted skips,
pixel limits, views chosen by the objective, and resumable rank-aware sampling."""

import io
import json
import logging

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from cppo_lightning import CPPOModule
from cppo_lightning.batch import MASKED, ORIGINAL, PRESERVING, REMOVING, TEXT_KEYS
from cppo_lightning.models import PolicyConfig, load_processor
from cppo_lightning.objectives import CPPO, GRPO, PAPO
from datamodules import DataSource, VisualQADataModule
from datamodules.examples import ImageLimits, PromptEncoder, fit_pixels
from datamodules.sampling import EpochProgress, ResumableDataLoader, ResumableSampler


def noise_image(seed, size=(84, 112)):
    """A random RGB image of ``(height, width)``: every perturbation visibly changes it."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def write_parquet(path, count, start=0, order=None):
    """``count`` examples ``q-<i>`` with an embedded image each, written as parquet."""
    order = order if order is not None else range(start, start + count)
    rows = {
        "id": [f"q-{i}" for i in order],
        "image": [noise_image(i) for i in order],
        "question": [f"How many shapes are in picture {i}?" for i in order],
        "answer": [str(i % 4) for i in order],
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


@pytest.fixture(scope="module")
def parquet_source(tmp_path_factory):
    path = write_parquet(tmp_path_factory.mktemp("vqa") / "train.parquet", 8)
    return DataSource(path=str(path), label="shapes")


def datamodule(source, model, **kwargs):
    kwargs.setdefault("batch_size", 4)
    return VisualQADataModule(train=source, processor_name_or_path=str(model), **kwargs)


def train_batches(dm, epoch=0):
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at the start of every epoch
    return list(loader)


def unpadded(batch, row, key):
    """Row ``row`` of a token-axis tensor of the batch without its left padding."""
    tensors = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, **batch.text_inputs}
    return tensors[key][row][batch.attention_mask[row].bool()]


# ------------------------------------------------------------------------------------------------
# 1. Three views, one token layout
# ------------------------------------------------------------------------------------------------


def test_views_share_the_token_layout_and_differ_in_pixels(tiny_vlm, parquet_source):
    dm = datamodule(parquet_source, tiny_vlm)
    dm.setup("fit")
    batch = train_batches(dm)[0]
    assert batch.views == (ORIGINAL, PRESERVING, REMOVING)
    processor = load_processor(str(tiny_vlm))
    encoder = dm.datasets["train"][0].encoder
    for row in range(len(batch)):
        text = encoder.prompt_text(batch.questions[row])
        # Run the processor on each view on its own: the tokens must be the same for all three, and the
        # vision inputs in the batch must be that view's (not another view's, not the original's).
        for view in batch.views:
            alone = dict(processor(images=[batch.images[view][row]], text=[text], return_tensors="pt"))
            for key in TEXT_KEYS:
                if key in alone:
                    torch.testing.assert_close(unpadded(batch, row, key), alone[key][0], rtol=0, atol=0)
            for key, value in batch.vision[view][row].items():
                torch.testing.assert_close(value, alone[key], rtol=0, atol=0)
        pixels = {view: batch.vision[view][row]["pixel_values"] for view in batch.views}
        assert not torch.equal(pixels[ORIGINAL], pixels[REMOVING])
        # I+ is not compared with I: its pool may draw the perspective transform, applied with p = 0.5.
        assert not torch.equal(pixels[PRESERVING], pixels[REMOVING])
        # Every view keeps the image size.
        assert {batch.images[view][row].shape for view in batch.views} == {batch.images[ORIGINAL][row].shape}
    assert ("mm_token_type_ids" in batch.text_inputs) == ("qwen" in str(tiny_vlm))


def test_a_view_of_another_size_is_refused_naming_the_example(tiny_qwen):
    # Qwen's image token count follows the image size: a view that changed the size would silently
    # desynchronise input_ids and pixel values, so the encoder refuses it.
    encoder = PromptEncoder(load_processor(str(tiny_qwen)), "{question}")
    image = np.zeros((56, 56, 3), np.uint8)
    taller = np.zeros((112, 56, 3), np.uint8)
    with pytest.raises(
        ValueError, match=r"example 'q-7': the 'removing' view produces a different token layout"
    ):
        encoder.encode("q-7", {ORIGINAL: image, REMOVING: taller}, "How many?", "1")


# ------------------------------------------------------------------------------------------------
# 2. Determinism: workers, epochs, instances
# ------------------------------------------------------------------------------------------------


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.ids == b.ids
        torch.testing.assert_close(a.input_ids, b.input_ids, rtol=0, atol=0)
        assert a.views == b.views
        for view in a.views:
            for x, y in zip(a.vision[view], b.vision[view], strict=True):
                torch.testing.assert_close(x["pixel_values"], y["pixel_values"], rtol=0, atol=0)


def test_two_workers_give_the_batches_of_one_process(tiny_qwen, parquet_source):
    single = datamodule(parquet_source, tiny_qwen, seed=3, num_workers=0)
    workers = datamodule(parquet_source, tiny_qwen, seed=3, num_workers=2)
    for dm in (single, workers):
        dm.setup("fit")
    for epoch in (0, 1):
        assert_same_batches(train_batches(single, epoch), train_batches(workers, epoch))


def test_each_epoch_draws_new_views_of_the_same_image(tiny_qwen, parquet_source):
    dm = datamodule(parquet_source, tiny_qwen, seed=3)
    dm.setup("fit")
    by_epoch = []
    for epoch in (0, 1):
        batches = train_batches(dm, epoch)
        by_epoch.append(
            {
                example_id: {view: batch.vision[view][row]["pixel_values"] for view in batch.views}
                for batch in batches
                for row, example_id in enumerate(batch.ids)
            }
        )
        # The epoch reaches the dataset (in any worker) through the (index, epoch) pairs the sampler yields.
        sampler = dm.train_dataloader().sampler
        assert {epoch_of for _, epoch_of in sampler} == {epoch}
    assert by_epoch[0].keys() == by_epoch[1].keys() and len(by_epoch[0]) == 8
    for example_id, views in by_epoch[0].items():
        later = by_epoch[1][example_id]
        assert torch.equal(views[ORIGINAL], later[ORIGINAL])
        assert not torch.equal(views[REMOVING], later[REMOVING])


def test_same_seed_epoch_and_id_give_the_same_views_in_another_datamodule(tiny_qwen, tmp_path):
    # The second DataModule reads the same examples in the reverse order: views follow the example id,
    # not its row.
    forward = DataSource(path=str(write_parquet(tmp_path / "forward.parquet", 6)))
    backward = DataSource(path=str(write_parquet(tmp_path / "backward.parquet", 6, order=range(5, -1, -1))))
    datasets_ = {}
    for name, source, seed in (("a", forward, 11), ("b", backward, 11), ("other seed", forward, 12)):
        dm = datamodule(source, tiny_qwen, seed=seed)
        dm.setup("fit")
        datasets_[name] = dm.datasets["train"][0]
    a, b, other = datasets_["a"], datasets_["b"], datasets_["other seed"]
    for index, example_id in enumerate(a.ids):
        mirrored = b.ids.index(example_id)
        assert mirrored == len(a.ids) - 1 - index
        first, second, reseeded = a[(index, 2)], b[(mirrored, 2)], other[(index, 2)]
        for view in (ORIGINAL, PRESERVING, REMOVING):
            np.testing.assert_array_equal(first.images[view], second.images[view])
            torch.testing.assert_close(
                first.vision[view]["pixel_values"], second.vision[view]["pixel_values"], rtol=0, atol=0
            )
        assert not np.array_equal(first.images[REMOVING], reseeded.images[REMOVING])


# ------------------------------------------------------------------------------------------------
# 3. Bad input: counted skips, conversions, strict mode
# ------------------------------------------------------------------------------------------------

LONG_QUESTION = "How many red circles are there? " * 30


def write_bad_jsonl(folder, cases):
    """A jsonl whose image paths are relative to its folder; ``cases`` are (id, example fields) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    noise_image(0, (56, 56)).save(folder / "images" / "good.png")
    noise_image(1, (56, 56)).save(folder / "images" / "second.png")
    Image.fromarray(np.full((56, 56), 90, np.uint8), mode="L").save(folder / "images" / "gray.png")
    # Fully transparent black: composited on white it must come out white.
    Image.fromarray(np.zeros((56, 56, 4), np.uint8), mode="RGBA").save(folder / "images" / "rgba.png")
    noise_image(2, (56, 56)).quantize(colors=16).save(folder / "images" / "palette.png")
    # Over PIL's decompression-bomb guard once `pixel_guard` lowers it to 10000 pixels (errors above 2x).
    Image.new("RGB", (200, 200)).save(folder / "images" / "bomb.png")
    full = (folder / "images" / "good.png").read_bytes()
    (folder / "images" / "truncated.png").write_bytes(full[: len(full) // 2])
    with open(folder / "data.jsonl", "w") as handle:
        for example_id, fields in cases:
            row = {"id": example_id, "image": ["images/good.png"], "question": "How many shapes?"}
            row.update({"answer": "2", **fields})
            row = {key: value for key, value in row.items() if value is not ...}
            handle.write(json.dumps(row) + "\n")
    return DataSource(path=str(folder / "data.jsonl"), label="bad")


BAD_CASES = {
    "no-answer": ({"answer": ...}, "missing answer", "field 'answer' is empty"),
    "empty-answer": ({"answer": "  "}, "missing answer", "field 'answer' is empty"),
    "truncated": ({"image": ["images/truncated.png"]}, "unreadable image", "truncated"),
    "missing-file": ({"image": ["images/nowhere.png"]}, "unreadable image", "nowhere.png' does not exist"),
    "bomb": ({"image": ["images/bomb.png"]}, "unreadable image", "DecompressionBombError"),
    "two-images": (
        {"image": ["images/good.png", "images/second.png"]},
        "several images",
        "2 images where one is expected",
    ),
    "too-long": ({"question": LONG_QUESTION}, "prompt too long", "max_prompt_tokens=80"),
    # Skipped for its length: its RGBA image is not counted among the conversions.
    "rgba-too-long": (
        {"question": LONG_QUESTION, "image": ["images/rgba.png"]},
        "prompt too long",
        "max_prompt_tokens=80",
    ),
}
CONVERTED = {
    "gray": ({"image": ["images/gray.png"]}, "L"),
    "rgba": ({"image": ["images/rgba.png"]}, "RGBA"),
    "palette": ({"image": ["images/palette.png"]}, "P"),
}


@pytest.fixture
def pixel_guard(monkeypatch):
    """PIL's decompression-bomb limit lowered so that a 200 x 200 image trips it (and 56 x 56 ones do not)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)


def test_bad_examples_are_counted_logged_and_odd_modes_converted(tiny_qwen, tmp_path, caplog, pixel_guard):
    cases = [
        ("good-1", {}),
        *((name, fields) for name, (fields, _, _) in BAD_CASES.items()),
        *((name, fields) for name, (fields, _) in CONVERTED.items()),
        ("good-2", {}),
    ]
    source = write_bad_jsonl(tmp_path / "bad", cases)
    # 8 of 13 skipped on purpose: above the default max_skip_fraction (0.2), which would stop set-up.
    dm = datamodule(
        source,
        tiny_qwen,
        prompt_template="{question}",
        max_prompt_tokens=80,
        batch_size=5,
        shuffle=False,
        max_skip_fraction=1.0,
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.vqa"):
        dm.setup("fit")

    report = dm.skip_reports[0]
    assert report.total == 13 and report.skipped == 8
    assert report.counts == {
        "missing answer": 2,
        "unreadable image": 3,
        "several images": 1,
        "prompt too long": 2,
    }
    assert report.converted == {"L": 1, "RGBA": 1, "P": 1}
    assert report.summary() == (
        "train:bad: kept 5 of 13 examples; skipped 3 unreadable image (e.g. truncated, missing-file, bomb); "
        "2 missing answer (e.g. no-answer, empty-answer); 2 prompt too long (e.g. too-long, rgba-too-long); "
        "1 several images (e.g. two-images); converted to RGB: 1 L, 1 RGBA, 1 P"
    )
    for name, (_, reason, detail) in BAD_CASES.items():
        messages = [r.getMessage() for r in caplog.records if f"example {name!r}" in r.getMessage()]
        assert len(messages) == 1 and reason in messages[0] and detail in messages[0], messages
    kept = ["good-1", "gray", "rgba", "palette", "good-2"]
    assert not any(f"example {name!r}" in r.getMessage() for r in caplog.records for name in kept)
    assert dm.datasets["train"][0].ids == kept
    (batch,) = train_batches(dm)
    for view in batch.views:
        for image, inputs in zip(batch.images[view], batch.vision[view], strict=True):
            assert image.shape == (56, 56, 3) and image.dtype == np.uint8
            # Qwen's flat patches: channels x temporal patch (2) x 14 x 14 = 3 x 2 x 196 = 1176 values.
            assert inputs["pixel_values"].shape == (16, 1176)
    np.testing.assert_array_equal(batch.images[ORIGINAL][1], np.full((56, 56, 3), 90, np.uint8))
    np.testing.assert_array_equal(batch.images[ORIGINAL][2], np.full((56, 56, 3), 255, np.uint8))
    palette = Image.open(tmp_path / "bad" / "images" / "palette.png")
    np.testing.assert_array_equal(batch.images[ORIGINAL][3], np.asarray(palette.convert("RGB")))


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_strict_mode_raises_on_the_first_bad_example_naming_it(tiny_qwen, tmp_path, pixel_guard, name):
    fields, reason, detail = BAD_CASES[name]
    cases = [("fine", {}), (name, fields), ("never-checked", {"answer": ""})]
    source = write_bad_jsonl(tmp_path / name, cases)
    dm = datamodule(source, tiny_qwen, prompt_template="{question}", max_prompt_tokens=80, strict=True)
    with pytest.raises(ValueError) as raised:
        dm.setup("fit")
    message = str(raised.value)
    assert message.startswith(f"train:bad: example {name!r} (row 1): {reason}") and detail in message
    assert "never-checked" not in message


def test_strict_mode_accepts_images_it_can_convert(tiny_qwen, tmp_path):
    source = write_bad_jsonl(tmp_path / "modes", [(name, fields) for name, (fields, _) in CONVERTED.items()])
    dm = datamodule(source, tiny_qwen, strict=True, batch_size=3)
    dm.setup("fit")
    expected = "train:bad: kept all 3 examples; converted to RGB: 1 L, 1 RGBA, 1 P"
    assert dm.skip_reports[0].summary() == expected


def test_truncated_bytes_embedded_in_parquet_are_a_counted_skip(tiny_qwen, tmp_path, caplog):
    # Hub datasets embed image bytes; a broken one must not crash set-up (images are decoded lazily).
    buffer = io.BytesIO()
    noise_image(0).save(buffer, format="PNG")
    data = buffer.getvalue()
    rows = {
        "id": ["whole", "cut"],
        "image": [{"bytes": data, "path": None}, {"bytes": data[:200], "path": None}],
        "question": ["How many?"] * 2,
        "answer": ["1"] * 2,
    }
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "cut.parquet"))
    dm = datamodule(
        DataSource(path=str(tmp_path / "cut.parquet")), tiny_qwen, batch_size=1, max_skip_fraction=0.5
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.vqa"):
        dm.setup("fit")
    expected = "train:cut-train: kept 1 of 2 examples; skipped 1 unreadable image (e.g. cut)"
    assert dm.skip_reports[0].summary() == expected
    assert "example 'cut' (row 1): unreadable image" in caplog.text
    assert dm.datasets["train"][0].ids == ["whole"]


def test_nothing_usable_is_an_error(tiny_qwen, tmp_path):
    cases = [("a", {"answer": ""}), ("b", {"image": ["images/nowhere.png"]})]
    source = write_bad_jsonl(tmp_path / "none", cases)
    with pytest.raises(ValueError, match=r"kept 0 of 2 examples.*no usable example left"):
        datamodule(source, tiny_qwen).setup("fit")


def test_prompt_limit_counts_exactly_the_tokens_the_model_sees(tiny_vlm):
    # The placeholder the chat template writes is replaced by the image tokens: a prompt of exactly
    # max_prompt_tokens tokens is kept, one more is a skip.
    processor = load_processor(str(tiny_vlm))
    image = noise_image(0, (56, 112))
    encoded = PromptEncoder(processor, "{question}").encode(
        "x", {ORIGINAL: np.asarray(image)}, "How many?", "1"
    )
    length = len(encoded.text_inputs["input_ids"])

    def check(limit):
        return PromptEncoder(processor, "{question}", max_prompt_tokens=limit).check("How many?", image)

    assert check(length) == length
    with pytest.raises(ValueError, match="prompt too long"):
        check(length - 1)


# ------------------------------------------------------------------------------------------------
# 5. Pixel limits
# ------------------------------------------------------------------------------------------------


def test_fit_pixels_by_hand():
    # max_pixels 12544 (= 112 x 112, 16 Qwen tokens), a 1000 x 500 (w x h) image:
    # beta = sqrt(500000 / 12544) = 6.313; h = floor(500 / 6.313 / 28) * 28 = floor(2.83) * 28 = 56,
    # w = floor(1000 / 6.313 / 28) * 28 = floor(5.66) * 28 = 140; 56 x 140 = 7840 <= 12544.
    wide = Image.new("RGB", (1000, 500))
    assert fit_pixels(wide, ImageLimits(max_pixels=12544, factor=28)).size == (140, 56)
    # min_pixels 3136 (56 x 56), a 10 x 10 image: rounding gives one 28 px cell (784 < 3136), so
    # beta = sqrt(3136 / 100) = 5.6 and each side is ceil(10 * 5.6 / 28) * 28 = 2 * 28 = 56.
    assert fit_pixels(Image.new("RGB", (10, 10)), ImageLimits(min_pixels=3136, factor=28)).size == (56, 56)
    # Without a minimum, still at least one patch: 10 px -> 14 px (LLaVA's factor).
    assert fit_pixels(Image.new("RGB", (10, 10)), ImageLimits(factor=14)).size == (14, 14)
    # Already within limits and on the grid: the same object, no resampling.
    image = Image.new("RGB", (112, 56))
    assert fit_pixels(image, ImageLimits(3136, 12544, 28)) is image


def test_huge_and_tiny_images_are_resized_not_dropped(tiny_qwen, tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    gradient = np.linspace(0, 255, 2000, dtype=np.uint8)
    Image.fromarray(np.repeat(np.tile(gradient, (1500, 1))[..., None], 3, axis=-1)).save(folder / "huge.png")
    noise_image(0, (10, 10)).save(folder / "tiny.png")
    noise_image(1, (500, 1000)).save(folder / "wide.png")
    with open(folder / "data.jsonl", "w") as handle:
        for name in ("huge", "tiny", "wide"):
            example = {"id": name, "image": f"{name}.png", "question": "How many?", "answer": "1"}
            handle.write(json.dumps(example) + "\n")
    source = DataSource(path=str(folder / "data.jsonl"))

    # The processor's limits (tiny Qwen: 3136 ... 50176 pixels) and the release's 512-token prompt limit,
    # which dropped every large image there. 2000 x 1500: beta = sqrt(3e6 / 50176) = 7.732,
    # h = floor(1500 / 7.732 / 28) * 28 = floor(6.93) * 28 = 168, w = floor(2000 / 7.732 / 28) * 28 =
    # floor(9.24) * 28 = 252: 12 x 18 patches of 14 px, 54 tokens after the 2 x 2 merge.
    dm = datamodule(source, tiny_qwen, batch_size=3, max_prompt_tokens=512, shuffle=False)
    dm.setup("fit")
    assert dm.skip_reports[0].skipped == 0
    (batch,) = train_batches(dm)
    sizes = {name: batch.images[ORIGINAL][row].shape[:2] for row, name in enumerate(batch.ids)}
    grids = {
        name: batch.vision[ORIGINAL][row]["image_grid_thw"].tolist() for row, name in enumerate(batch.ids)
    }
    assert sizes["huge"] == (168, 252) and grids["huge"] == [[1, 12, 18]]
    assert sizes["tiny"] == (56, 56) and grids["tiny"] == [[1, 4, 4]]
    assert sizes["huge"][0] * sizes["huge"][1] <= 50176

    # A configured max_pixels below the processor's: the hand-computed 56 x 140 above, 4 x 10 patches.
    capped = datamodule(source, tiny_qwen, batch_size=3, max_pixels=12544, shuffle=False)
    capped.setup("fit")
    (batch,) = train_batches(capped)
    row = batch.ids.index("wide")
    assert batch.images[ORIGINAL][row].shape == (56, 140, 3)
    assert batch.vision[ORIGINAL][row]["image_grid_thw"].tolist() == [[1, 4, 10]]
    for view in batch.views:
        for image in batch.images[view]:
            height, width = image.shape[:2]
            assert height % 28 == 0 and width % 28 == 0 and height * width <= 12544


# ------------------------------------------------------------------------------------------------
# 6. Views chosen by the objective
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective, views",
    [(GRPO(), (ORIGINAL,)), (CPPO(), (ORIGINAL, PRESERVING, REMOVING)), (PAPO(), (ORIGINAL, MASKED))],
    ids=["grpo", "cppo", "papo"],
)
def test_views_follow_the_attached_module(tiny_qwen, parquet_source, objective, views):
    module = CPPOModule(policy=PolicyConfig(str(tiny_qwen)), objective=objective)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)  # what Trainer.fit does before it calls the DataModule's setup
    dm = datamodule(parquet_source, tiny_qwen)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.wanted_views() == module.required_views == views
    batch = train_batches(dm)[0]
    assert batch.views == views and tuple(batch.images) == views
    if MASKED in views:
        # PAPO blackens whole 14 px cells: the masked view has pure-black cells the original lacks.
        black = {view: (batch.images[view][0] == 0).all(axis=-1).sum() for view in views}
        assert black[MASKED] > black[ORIGINAL]


def test_papo_batches_mask_the_raw_image_before_the_resize(tiny_qwen, tmp_path):
    # A 448 px white image, resized by 1/2 into max_pixels 224 x 224: PAPO's 14 px cells of the raw image
    # are 7 px cells in the batch's masked view (masking after the resize would give 14 px cells).
    Image.fromarray(np.full((448, 448, 3), 255, np.uint8)).save(tmp_path / "white.png")
    example = {"id": "w", "image": "white.png", "question": "How many?", "answer": "1"}
    (tmp_path / "data.jsonl").write_text(json.dumps(example) + "\n")
    dm = datamodule(
        DataSource(path=str(tmp_path / "data.jsonl")),
        tiny_qwen,
        batch_size=1,
        views=["masked"],
        max_pixels=50176,
    )
    dm.setup("fit")
    (batch,) = train_batches(dm)
    masked = batch.images[MASKED][0]
    assert masked.shape == batch.images[ORIGINAL][0].shape == (224, 224, 3)
    centres = masked[3::7, 3::7, 0]
    assert set(np.unique(centres)) == {0, 255}
    np.testing.assert_array_equal(masked[2::7, 2::7, 0], centres)  # the cores of 7 px cells agree
    assert (centres[:, 0::2] != centres[:, 1::2]).any()  # and neighbouring 7 px cells differ somewhere


def test_without_a_module_the_datamodule_makes_cppo_views_or_the_configured_ones(tiny_qwen, parquet_source):
    assert datamodule(parquet_source, tiny_qwen).wanted_views() == (ORIGINAL, PRESERVING, REMOVING)
    assert datamodule(parquet_source, tiny_qwen, views=["masked"]).wanted_views() == (ORIGINAL, MASKED)
    with pytest.raises(ValueError, match="unknown views"):
        datamodule(parquet_source, tiny_qwen, views=["blurred"]).wanted_views()


class RecordViews(pl.Callback):
    def __init__(self):
        self.views = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.views.append(batch.views)


def test_a_real_fit_hands_the_module_its_views(tiny_qwen, parquet_source):
    from cppo_lightning.module import UpdateConfig
    from cppo_lightning.sampling import RolloutConfig

    module = CPPOModule(
        policy=PolicyConfig(str(tiny_qwen)),
        objective=PAPO(),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=4),
        update=UpdateConfig(micro_batch_rollouts=4),
    )
    record = RecordViews()
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(module, datamodule=datamodule(parquet_source, tiny_qwen, batch_size=2))
    assert record.views == [(ORIGINAL, MASKED)]


# ------------------------------------------------------------------------------------------------
# 7. Resumable, rank-aware sampling
# ------------------------------------------------------------------------------------------------


class Keys(torch.utils.data.Dataset):
    """Returns the ``(index, epoch)`` key it is asked for."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        return key


def index_loader(size, batch_size, rank=0, replicas=1, progress=None):
    progress = progress or EpochProgress()
    dataset = Keys(size)
    sampler = ResumableSampler(
        dataset, batch_size, num_replicas=replicas, rank=rank, seed=7, progress=progress
    )
    return ResumableDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=list,
        progress=progress,
        batches_per_epoch=len(sampler) // batch_size,
    )


def epoch_batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_resume_mid_epoch_skips_exactly_the_consumed_batches():
    # 12 examples in batches of 3: 4 batches per epoch.
    straight = index_loader(12, 3)
    expected = {epoch: epoch_batches(straight, epoch) for epoch in (0, 1)}
    assert expected[0] != expected[1]  # reshuffled every epoch
    assert sorted(i for batch in expected[0] for i, _ in batch) == list(range(12))
    assert {e for batch in expected[1] for _, e in batch} == {1}

    interrupted = index_loader(12, 3)
    interrupted.sampler.set_epoch(0)
    batches = iter(interrupted)
    for _ in range(2):
        next(batches)
        interrupted.progress.consumed_batches += 1  # the DataModule counts batches that reached the module
    next(batches)  # prefetched by a worker but never trained on: not counted
    state = interrupted.state_dict()
    assert state == {"epoch": 0, "consumed_batches": 2}

    resumed = index_loader(12, 3)
    resumed.load_state_dict(state)
    assert epoch_batches(resumed, 0) == expected[0][2:]
    assert epoch_batches(resumed, 1) == expected[1]  # the skip applies once


def test_resume_after_a_complete_epoch_starts_the_next_one():
    expected = epoch_batches(index_loader(12, 3), 1)
    resumed = index_loader(12, 3)
    resumed.load_state_dict({"epoch": 0, "consumed_batches": 4})
    assert resumed.progress.epoch == 1 and resumed.state_dict() == {"epoch": 1, "consumed_batches": 0}
    assert epoch_batches(resumed, 1) == expected


def test_two_ranks_get_disjoint_shards_that_cover_the_dataset():
    for epoch in (0, 1):
        shards = [
            [i for batch in epoch_batches(index_loader(12, 3, rank, 2), epoch) for i, _ in batch]
            for rank in (0, 1)
        ]
        assert len(shards[0]) == len(shards[1]) == 6
        assert not set(shards[0]) & set(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(12))
    # Resuming skips each rank's own consumed batches: 1 batch of 3 on each rank.
    for rank in (0, 1):
        full = epoch_batches(index_loader(12, 3, rank, 2), 0)
        resumed = index_loader(12, 3, rank, 2)
        resumed.load_state_dict({"epoch": 0, "consumed_batches": 1})
        assert epoch_batches(resumed, 0) == full[1:]


class RecordIds(pl.LightningModule):
    """The smallest module a Trainer accepts: it records which examples each step trained on."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch.ids)
        return self.weight.square().sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_resumed_trainer_sees_exactly_the_batches_it_did_not_train_on(tiny_qwen, parquet_source, tmp_path):
    # 8 examples in batches of 2: 4 steps per epoch. Stop mid-epoch (3) and right at the end of one (4).
    def fit(steps, ckpt_path=None, callbacks=()):
        module = RecordIds()
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        dm = datamodule(parquet_source, tiny_qwen, batch_size=2, views=["original"])
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.seen

    straight = fit(7)
    assert sorted(sum(straight[:4], [])) == [f"q-{i}" for i in range(8)]  # one epoch sees every example once
    assert straight[4:] != straight[:3]  # and the next one is reshuffled
    for stop in (3, 4):
        folder = tmp_path / str(stop)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=stop)
        assert fit(stop, callbacks=[checkpoint]) == straight[:stop]
        assert fit(7, ckpt_path=folder / "last.ckpt") == straight[stop:]

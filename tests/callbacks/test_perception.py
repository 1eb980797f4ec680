"""PerceptionTokenVisualizer on a real (tiny) CPPO run: the HTML page has one element per completion
token and marks exactly the tokens CPPO selected, the PNG shows the three views, TensorBoard gets the
image, and a visualizer that is not due does nothing at all."""

import io
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

import callbacks.perception as perception
from callbacks import PerceptionTokenVisualizer
from cppo_lightning.module import CPPOModule
from cppo_lightning.objectives import CPPO
from cppo_lightning.rewards import extract_boxed
from helpers import VIEW_COLOURS, HandWrittenDataModule, small_module

# Markup in the question: the page must escape it.
QUESTION = "How many shapes <b>&amp; {}?"


@dataclass
class Run:
    trainer: pl.Trainer
    module: CPPOModule
    render_calls: list  # the stem of every render_perception call
    idle_hook_seconds: list  # time spent in each on_train_batch_end of a visualizer that is never due
    idle_dir: Path


@pytest.fixture(scope="module")
def cppo_run(tiny_qwen, tmp_path_factory):
    """Three CPPO steps (G=4, 2 prompts per step) drawn at every step, then one validation; beside it a
    visualizer due every 1000 steps, and a spy on the renderer."""
    root = tmp_path_factory.mktemp("perception-run")
    module = small_module(tiny_qwen, CPPO())
    idle = PerceptionTokenVisualizer(every_n_steps=1000, on_validation=False, output_dir=root / "idle")
    run = Run(None, module, [], [], root / "idle")
    render = perception.render_perception
    idle_hook = idle.on_train_batch_end

    def spy(rollout, rows, tokenizer, stem, title):
        run.render_calls.append(stem)
        return render(rollout, rows, tokenizer, stem, title)

    def timed_idle_hook(*args, **kwargs):
        started = time.perf_counter()
        idle_hook(*args, **kwargs)
        run.idle_hook_seconds.append(time.perf_counter() - started)

    run.trainer = pl.Trainer(
        max_steps=3,
        logger=TensorBoardLogger(root, name="run"),
        callbacks=[PerceptionTokenVisualizer(every_n_steps=1, num_rollouts=4), idle],
        limit_val_batches=1,
        val_check_interval=3,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(perception, "render_perception", spy)
        patch.setattr(idle, "on_train_batch_end", timed_idle_hook)
        run.trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, question=QUESTION))
    return run


class PageParser(HTMLParser):
    """Per ``<section class="rollout" data-row=...>``: its token spans (text, classes, data-dh)."""

    def __init__(self):
        super().__init__()
        self.sections = {}
        self.row = None
        self.token = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if tag == "section" and "rollout" in classes:
            self.row = int(attrs["data-row"])
            self.sections[self.row] = []
        elif tag == "span" and "tok" in classes:
            assert self.row is not None, "a token outside a rollout section"
            self.token = {"text": "", "perception": "perception" in classes, "dh": attrs.get("data-dh")}
            self.sections[self.row].append(self.token)

    def handle_endtag(self, tag):
        if tag == "span":
            self.token = None
        elif tag == "section":
            self.row = None

    def handle_data(self, data):
        if self.token is not None:
            self.token["text"] += data


def parse_page(path):
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.sections


def test_files_per_training_step_and_validation_not_sanity_check(cppo_run):
    trainer = cppo_run.trainer
    names = sorted(path.name for path in Path(trainer.log_dir, "perception").iterdir())
    # Steps are named as the loggers count them (0-based); the sanity check before training draws nothing.
    stems = ("step_000000", "step_000001", "step_000002", "val_step_000002")
    assert names == sorted(f"{stem}.{suffix}" for stem in stems for suffix in ("html", "png"))


def test_html_has_one_element_per_token_and_marks_exactly_the_perception_tokens(cppo_run):
    trainer, module = cppo_run.trainer, cppo_run.module
    rollout = module.last_rollout  # the rollout of the last step, step 2
    tokenizer = module.policy.processor.tokenizer
    sections = parse_page(Path(trainer.log_dir, "perception") / "step_000002.html")

    advantages = rollout.advantages.cpu()
    drawn = [float(advantages[row]) for row in sections]
    # Highest advantages first (they have the I- entropies), the lowest one last for contrast.
    assert len(drawn) == 4
    assert drawn[:3] == sorted(advantages.tolist(), reverse=True)[:3]
    assert drawn[3] == float(advantages.min())

    mask = rollout.completion_mask.cpu()
    selected = rollout.perception_mask.cpu()
    dh = (rollout.entropy_removed - rollout.entropy).cpu()
    marked_total = 0
    for row, tokens in sections.items():
        keep = mask[row]
        assert len(tokens) == int(keep.sum())
        assert sum(token["perception"] for token in tokens) == int(selected[row].sum())
        # Token i of the page is completion token i, and the mark sits on the selected positions.
        ids = rollout.completion_ids[row].cpu()[keep].tolist()
        assert [token["text"] for token in tokens] == [tokenizer.decode([i]) for i in ids]
        assert [token["perception"] for token in tokens] == selected[row][keep].tolist()
        # Shading carries dH where the update computed it (rows with A > 0 under gating), else nothing.
        row_dh = dh[row][keep]
        shaded = [token["dh"] is not None for token in tokens]
        assert shaded == torch.isfinite(row_dh).tolist()
        if float(advantages[row]) <= 0:
            assert not any(shaded)
        for token, value in zip(tokens, row_dh.tolist()):
            if token["dh"] is not None:
                assert float(token["dh"]) == pytest.approx(value, rel=1e-4, abs=1e-6)
        marked_total += int(selected[row].sum())
    assert marked_total > 0, "no perception token in the drawn rows: the test would prove nothing"


def test_html_shows_question_answers_and_embedded_images(cppo_run):
    trainer, module = cppo_run.trainer, cppo_run.module
    rollout = module.last_rollout
    page = (Path(trainer.log_dir, "perception") / "step_000002.html").read_text(encoding="utf-8")
    # The question holds HTML: it is escaped, never injected.
    assert "How many shapes &lt;b&gt;&amp;amp;" in page and "<b>" not in page
    assert page.count('src="data:image/png;base64,') == 3 * 4
    row = list(parse_page(Path(trainer.log_dir, "perception") / "step_000002.html"))[0]
    reference = rollout.batch.answers[int(rollout.example_rows[row])]
    extracted = extract_boxed(rollout.completions[row])
    assert f"vs reference  {reference}" in page
    if extracted is not None:
        assert extracted in page


def test_validation_page_has_tokens_but_no_entropies(cppo_run):
    trainer, module = cppo_run.trainer, cppo_run.module
    rollout = module.last_eval_rollout
    sections = parse_page(Path(trainer.log_dir, "perception") / "val_step_000002.html")
    assert sections
    for row, tokens in sections.items():
        assert len(tokens) == int(rollout.completion_mask[row].sum())
        assert not any(token["perception"] or token["dh"] is not None for token in tokens)


def test_png_shows_the_three_views_left_to_right(cppo_run):
    trainer = cppo_run.trainer
    image = np.asarray(Image.open(Path(trainer.log_dir, "perception") / "step_000002.png").convert("RGB"))
    centres = {}
    for view, colour in VIEW_COLOURS.items():
        ys, xs = np.nonzero(np.all(image == colour, axis=-1))
        # Four rollouts, each view a 56-pixel image drawn at least twice its size.
        assert len(xs) > 4 * (2 * 56) ** 2, f"the {view} view is missing from the PNG"
        centres[view] = xs.mean()
    assert centres["original"] < centres["preserving"] < centres["removing"]


def test_tensorboard_receives_the_png(cppo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = cppo_run.trainer
    events = EventAccumulator(trainer.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("perception/train")] == [0, 1, 2]
    assert [event.step for event in events.Images("perception/val")] == [2]
    drawn = Image.open(io.BytesIO(events.Images("perception/train")[-1].encoded_image_string))
    assert drawn.size == Image.open(Path(trainer.log_dir, "perception") / "step_000002.png").size


def test_not_due_costs_nothing(cppo_run):
    # The due visualizer rendered 3 training steps and 1 validation; the idle one never reached the renderer.
    rendered = [stem.name for stem in cppo_run.render_calls]
    assert rendered == ["step_000000", "step_000001", "step_000002", "val_step_000002"]
    assert all(cppo_run.idle_dir not in stem.parents for stem in cppo_run.render_calls)
    assert not cppo_run.idle_dir.exists()
    # Its hook ran at every step and cost a modulo and a return: microseconds. 5 ms for three calls
    # leaves room for a loaded CI machine (one render takes hundreds of milliseconds).
    assert len(cppo_run.idle_hook_seconds) == 3
    assert sum(cppo_run.idle_hook_seconds) < 5e-3

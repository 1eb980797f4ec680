"""What the model saw and which tokens CPPO treated as perception tokens.

Every ``every_n_steps`` training steps (and after validation), a few rollouts of the last batch are drawn
as

* ``perception/step_XXXXXX.html``: a self-contained page (inline CSS, images as data URIs) with the views
  ``I``, ``I+``, ``I-`` side by side, the question, and the completion with one ``<span class="tok">`` per
  token, shaded by its entropy shift ``dH = H(I-) - H(I)`` (red: the token became less certain without the
  visual information; blue: more certain; unshaded: no ``dH``, e.g. a row gated out with ``A <= 0``),
  the selected perception tokens outlined (``class="tok perception"``), with reward, advantage and the
  extracted answer against the reference;
* ``perception/step_XXXXXX.png``: the same views and the completion with perception tokens highlighted,
  also sent to TensorBoard when the trainer logs there.

Validation pages are named ``val_step_XXXXXX`` (no entropies: evaluation does not score views).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import colormaps
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from PIL import Image
from typing_extensions import override

from callbacks.rollout_log import logger_step, resolve_log_dir
from cppo_lightning.batch import MASKED, ORIGINAL, PRESERVING, REMOVING
from cppo_lightning.rewards import extract_boxed

log = logging.getLogger(__name__)

#: Views in display order, with the paper's names.
VIEW_LABELS = {
    ORIGINAL: "I (original)",
    PRESERVING: "I+ (preserving)",
    REMOVING: "I- (removing)",
    MASKED: "I mask (PAPO)",
}
#: Red: dH > 0, the token became less certain without the visual information. Kept light (see
#: ``_dh_colour``) so that the text stays readable.
_COLORMAP = "RdBu_r"
#: Tokens drawn per rollout in the PNG (the HTML page has all of them).
PNG_MAX_TOKENS = 400


def select_rows(rollout, count: int) -> list[int]:
    """Rollouts worth drawing: the highest advantages first (only rows with ``A > 0`` have an ``I-``
    entropy under gating), and the lowest-advantage one last for contrast. Ties go by reward.

    Returns:
        Up to ``count`` row indices.
    """
    advantages = rollout.advantages.detach().float().cpu().numpy()
    rewards = rollout.rewards.detach().float().cpu().numpy()
    order = np.lexsort((-rewards, -advantages)).tolist()
    if count >= len(order):
        return order
    if count == 1:
        return order[:1]
    return order[: count - 1] + order[-1:]


def token_rows(rollout, rows: list[int], tokenizer) -> list[dict]:
    """Per selected rollout: its tokens (one decoded piece per completion token), ``dH``, perception flags.

    Returns:
        One dict per row: ``row``, ``id``, ``question``, ``answer``, ``extracted``, ``reward``, ``advantage``,
        ``reward_terms``, ``images`` (view -> uint8 ``[H, W, 3]``), ``tokens`` (list of str), ``entropy``,
        ``entropy_removed``, ``dh`` (float arrays, NaN where unknown) and ``perception`` (bool array), the
        arrays with one entry per completion token (``completion_mask`` of the row).
    """
    index = torch.as_tensor(rows, dtype=torch.long)

    def take(tensor):
        return None if tensor is None else tensor.detach()[index.to(tensor.device)].cpu()

    ids, mask = take(rollout.completion_ids), take(rollout.completion_mask).bool()
    entropy, removed = take(rollout.entropy), take(rollout.entropy_removed)
    perception = take(rollout.perception_mask)
    batch = rollout.batch
    result = []
    for position, row in enumerate(rows):
        keep = mask[position]
        count = int(keep.sum())
        token_ids = ids[position][keep].tolist()
        nan = np.full(count, np.nan)
        h = entropy[position][keep].float().numpy() if entropy is not None else nan
        h_removed = removed[position][keep].float().numpy() if removed is not None else nan
        example = int(rollout.example_rows[row])
        completion = rollout.completions[row]
        result.append(
            {
                "row": row,
                "id": batch.ids[example] if batch is not None else str(example),
                "question": batch.questions[example] if batch is not None and batch.questions else "",
                "answer": batch.answers[example] if batch is not None else "",
                "extracted": extract_boxed(completion),
                "reward": float(rollout.rewards[row]),
                "advantage": float(rollout.advantages[row]),
                "reward_terms": {name: float(values[row]) for name, values in rollout.reward_terms.items()},
                "images": {
                    view: np.asarray(batch.images[view][example])
                    for view in VIEW_LABELS
                    if batch is not None and view in batch.images
                },
                "tokens": [tokenizer.decode([token]) for token in token_ids],
                "entropy": h,
                "entropy_removed": h_removed,
                "dh": h_removed - h,
                "perception": (
                    perception[position][keep].numpy() if perception is not None else np.zeros(count, bool)
                ),
            }
        )
    return result


def _dh_scale(rows: list[dict]) -> float:
    """Half-width of the diverging colour scale: the largest ``|dH|`` on the page."""
    values = [np.abs(r["dh"][np.isfinite(r["dh"])]) for r in rows]
    largest = max((float(v.max()) for v in values if v.size), default=0.0)
    return largest if largest > 0 else 1.0


def _dh_colour(dh: float, scale: float) -> str | None:
    if not math.isfinite(dh):
        return None
    return to_hex(colormaps[_COLORMAP](0.5 + 0.35 * max(-1.0, min(1.0, dh / scale))))


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section.rollout { border-top: 1px solid #ccc; padding: 1em 0; }
.views { display: flex; gap: 1em; }
.views figure { margin: 0; text-align: center; }
.views img { width: 224px; image-rendering: pixelated; border: 1px solid #ddd; }
.meta td { padding: 0 1em 0 0; }
.completion { font-family: monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { padding: 1px 0; }
.tok.perception { outline: 2px solid #000; outline-offset: -1px; font-weight: bold; }
.legend span { padding: 0 0.5em; }
.key-perception { outline: 2px solid #000; font-weight: bold; }
"""


def perception_html(rows: list[dict], title: str) -> str:
    """The HTML page of :func:`token_rows` output (every text through ``html.escape``)."""
    scale = _dh_scale(rows)
    low, high = _dh_colour(-scale, scale), _dh_colour(scale, scale)
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<p class="legend">Entropy shift dH = H(I-) - H(I) per token: '
        f'<span style="background:{low}">dH = {-scale:.3g}</span>'
        f'<span style="background:#ffffff">0</span>'
        f'<span style="background:{high}">dH = +{scale:.3g}</span>; '
        '<span class="key-perception">outlined</span> tokens are the perception tokens CPPO selected; '
        "unshaded tokens have no dH (no I- forward, e.g. gated out with A &le; 0).</p>",
    ]
    for info in rows:
        parts.append(f'<section class="rollout" data-row="{info["row"]}">')
        parts.append(f"<h2>rollout {info['row']} &middot; example {e(str(info['id']))}</h2>")
        parts.append('<div class="views">')
        for view, image in info["images"].items():
            parts.append(
                f'<figure><img alt="{e(view)}" src="{_png_data_uri(image)}">'
                f"<figcaption>{e(VIEW_LABELS[view])}</figcaption></figure>"
            )
        if not info["images"]:
            parts.append("<p>(the batch carries no raw images)</p>")
        parts.append("</div>")
        extracted = info["extracted"] if info["extracted"] is not None else "(no \\boxed{})"
        terms = ", ".join(f"{name} {value:.3g}" for name, value in info["reward_terms"].items())
        parts.append('<table class="meta">')
        for key, value in (
            ("question", info["question"]),
            ("reward", f"{info['reward']:.4g} ({terms})" if terms else f"{info['reward']:.4g}"),
            ("advantage", f"{info['advantage']:.4g}"),
            ("answer", f"{extracted}  vs reference  {info['answer']}"),
            ("perception tokens", f"{int(info['perception'].sum())} of {len(info['tokens'])}"),
        ):
            parts.append(f'<tr><th align="left">{e(key)}</th><td>{e(value)}</td></tr>')
        parts.append("</table>")
        spans = []
        for piece, h, h_removed, dh, selected in zip(
            info["tokens"], info["entropy"], info["entropy_removed"], info["dh"], info["perception"]
        ):
            classes = "tok perception" if selected else "tok"
            colour = _dh_colour(float(dh), scale)
            tip = (
                f"H(I) {h:.3f}, H(I-) {h_removed:.3f}, dH {dh:+.3g}"
                if colour
                else (f"H(I) {h:.3f}, no I- entropy" if math.isfinite(h) else "no entropy")
            )
            attributes = f'class="{classes}" title="{e(tip)}"'
            if colour:
                attributes += f' data-dh="{dh:.6g}" style="background:{colour}"'
            spans.append(f"<span {attributes}>{e(piece)}</span>")
        parts.append('<div class="completion">' + "".join(spans) + "</div>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def perception_figure(rows: list[dict], title: str, width: float = 12.0) -> Figure:
    """A matplotlib figure (no pyplot, no global backend): per rollout, its views side by side and below
    them the completion, tokens shaded by ``dH`` and perception tokens boxed in black.

    The completion is laid out on a monospace grid: one text object per line and one collection of
    rectangles for the shading, so a long completion draws in about the time of a short one.
    """
    font, line_height, dpi = 8.0, 1.6 * 8.0, 100  # points
    char_width = _monospace_advance(font, dpi)
    margin, image_height, title_height = 0.3, 2.4, 0.45  # inches
    columns = (width - 2 * margin) * 72 / char_width
    chars = int(columns)
    scale = _dh_scale(rows)
    layouts = [_wrap_tokens(info, chars) for info in rows]
    heights = [h for _, lines in layouts for h in (image_height, (lines + 3) * line_height / 72)]
    total = sum(heights) + title_height
    figure = Figure(figsize=(width, total), dpi=dpi)
    figure.text(0.5, 1 - 0.1 / total, title, fontsize=11, ha="center", va="top", parse_math=False)
    grid = figure.add_gridspec(
        len(heights),
        1,
        height_ratios=heights,
        left=margin / width,
        right=1 - margin / width,
        top=1 - title_height / total,
        bottom=0,
        hspace=0,
    )
    for index, (info, (placed, lines)) in enumerate(zip(rows, layouts)):
        axis = figure.add_subplot(grid[2 * index])
        axis.set_axis_off()
        if info["images"]:
            strip, centres = _image_strip(info["images"])
            axis.imshow(strip, interpolation="nearest")
            axis.set_ylim(strip.shape[0] - 0.5, -0.5 - 0.12 * strip.shape[0])  # room for the labels
            for view, centre in centres.items():
                axis.text(centre, -1, VIEW_LABELS[view], ha="center", va="bottom", fontsize=9)
        else:
            axis.text(0.5, 0.5, "(the batch carries no raw images)", ha="center", va="center")
        text = figure.add_subplot(grid[2 * index + 1])
        text.set_axis_off()
        text.set_xlim(0, columns)
        text.set_ylim(lines + 3, 0)
        extracted = info["extracted"]
        header = (
            f"rollout {info['row']}  example {info['id']}  reward {info['reward']:.3g}  "
            f"advantage {info['advantage']:.3g}  "
            f"answer {extracted if extracted is not None else '-'} (reference {info['answer']})  "
            f"perception tokens {int(info['perception'].sum())}/{len(info['tokens'])}"
        )
        style = dict(fontsize=font, family="monospace", va="top", ha="left", parse_math=False)
        text.text(0, 0.2, header[:chars], fontweight="bold", **style)
        text.text(0, 1.2, f"Q: {info['question']}"[:chars], **style)
        grid_lines = [[" "] * chars for _ in range(lines)]
        shading, colours, outlines = [], [], []
        for line, column, piece, dh, selected in placed:
            grid_lines[line][column : column + len(piece)] = list(piece)
            end = column + len(piece)
            box = [(column, line + 2), (end, line + 2), (end, line + 3), (column, line + 3)]
            colour = _dh_colour(dh, scale)
            if colour:
                shading.append(box)
                colours.append(colour)
            if selected:
                outlines.append(box)
        text.add_collection(PolyCollection(shading, facecolors=colours, edgecolors="none", zorder=1))
        text.add_collection(
            PolyCollection(outlines, facecolors="none", edgecolors="black", linewidths=1.2, zorder=3)
        )
        for line, characters in enumerate(grid_lines):
            text.text(0, line + 2.2, "".join(characters).rstrip(), zorder=2, **style)
    return figure


def _monospace_advance(size: float, dpi: int) -> float:
    """Width in points of one monospace character as Agg draws it at ``dpi`` (glyph advances are
    hinted to whole pixels, so the nominal 0.6 em drifts over a long line)."""
    renderer = RendererAgg(10, 10, dpi)
    sample = "0" * 100
    font = FontProperties(family="monospace", size=size)
    width, _, _ = renderer.get_text_width_height_descent(sample, font, ismath=False)
    return width / len(sample) * 72 / dpi


def _image_strip(images: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, float]]:
    """The views side by side on white, one image (one axes draws faster than one per view), and the
    x centre of each view."""
    height = max(image.shape[0] for image in images.values())
    gap = max(4, height // 20)
    pieces, centres, x = [], {}, 0
    for view, image in images.items():
        image = np.asarray(image, dtype=np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        image = image[..., :3]
        padded = np.full((height, image.shape[1], 3), 255, np.uint8)
        padded[: image.shape[0]] = image
        if pieces:
            pieces.append(np.full((height, gap, 3), 255, np.uint8))
            x += gap
        pieces.append(padded)
        centres[view] = x + image.shape[1] / 2 - 0.5
        x += image.shape[1]
    return np.concatenate(pieces, axis=1), centres


def _wrap_tokens(info: dict, chars: int) -> tuple[list[tuple[int, int, str, float, bool]], int]:
    """``(line, column, text, dH, perception)`` pieces of a monospace layout ``chars`` wide, and the
    number of lines.

    A newline inside a token shows as ``↵`` before the break; an empty piece that CPPO selected shows as a
    marked blank.
    """
    placed, line, column = [], 0, 0

    def put(segment: str, dh: float, selected: bool) -> None:
        nonlocal line, column
        while segment:
            if column >= chars:
                line, column = line + 1, 0
            chunk = segment[: chars - column]
            placed.append((line, column, chunk, dh, selected))
            column += len(chunk)
            segment = segment[len(chunk) :]

    count = min(len(info["tokens"]), PNG_MAX_TOKENS)
    for piece, dh, selected in zip(info["tokens"][:count], info["dh"][:count], info["perception"][:count]):
        dh, selected = float(dh), bool(selected)
        segments = "".join(c if c.isprintable() or c == "\n" else " " for c in piece).split("\n")
        for number, segment in enumerate(segments):
            if number:
                put("↵", dh, selected)
                line, column = line + 1, 0
            put(segment, dh, selected)
        if not piece and selected:
            put(" ", dh, selected)
    if count < len(info["tokens"]):
        line, column = line + 1, 0
        put(f"... ({len(info['tokens']) - count} more tokens in the HTML page)"[:chars], math.nan, False)
    return placed, line + 1


def figure_png(figure: Figure) -> bytes:
    """PNG bytes of a figure (missing-glyph warnings of exotic tokens silenced)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing.*")
        figure.savefig(buffer, format="png", facecolor="white", dpi=figure.dpi)
    return buffer.getvalue()


def render_perception(
    rollout, rows: list[int], tokenizer, stem: Path, title: str
) -> tuple[Path, Path, bytes]:
    """Write ``<stem>.html`` and ``<stem>.png`` for the given rollouts.

    Returns:
        ``(html_path, png_path, png_bytes)``.
    """
    info = token_rows(rollout, rows, tokenizer)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html_path, png_path = stem.with_suffix(".html"), stem.with_suffix(".png")
    html_path.write_text(perception_html(info, title), encoding="utf-8")
    png = figure_png(perception_figure(info, title))
    png_path.write_bytes(png)
    return html_path, png_path, png


class PerceptionTokenVisualizer(pl.Callback):
    """Draw the last rollouts' views, entropy shifts and perception tokens every ``every_n_steps`` steps.

    Only rank zero draws (its own rollouts). A step that is not due costs one modulo.

    Args:
        every_n_steps: draw after one training step in this many (steps counted as the loggers count
            them, so ``step_000049`` lines up with the metrics logged at step 49).
        num_rollouts: rollouts per page.
        on_validation: also draw the last validation batch after each validation run
            (``val_step_XXXXXX``).
        output_dir: folder that receives ``perception/``; default: the trainer's ``log_dir``.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_rollouts: int = 4,
        on_validation: bool = True,
        output_dir: str | Path | None = None,
    ) -> None:
        if every_n_steps < 1 or num_rollouts < 1:
            raise ValueError(
                f"every_n_steps ({every_n_steps}) and num_rollouts ({num_rollouts}) must be >= 1"
            )
        self.every_n_steps = every_n_steps
        self.num_rollouts = num_rollouts
        self.on_validation = on_validation
        self.output_dir = output_dir
        self.folder: Path | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.folder = resolve_log_dir(trainer, self.output_dir) / "perception"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = logger_step(trainer)
        if (step + 1) % self.every_n_steps or not trainer.is_global_zero:
            return
        rollout = getattr(pl_module, "last_rollout", None)
        self._draw(trainer, pl_module, rollout, f"step_{step:06d}", "train", step)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = logger_step(trainer)
        rollout = getattr(pl_module, "last_eval_rollout", None)
        self._draw(trainer, pl_module, rollout, f"val_step_{step:06d}", "val", step)

    def _draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, rollout, name: str, tag: str, step: int
    ) -> None:
        if rollout is None or self.folder is None:
            return
        started = time.perf_counter()
        tokenizer = pl_module.policy.processor.tokenizer
        rows = select_rows(rollout, self.num_rollouts)
        objective = getattr(pl_module, "objective", None)
        title = f"{tag} step {step}: {type(objective if objective is not None else pl_module).__name__}"
        _, _, png = render_perception(rollout, rows, tokenizer, self.folder / name, title)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
                logger.experiment.add_image(f"perception/{tag}", image, global_step=step, dataformats="HWC")
        log.debug("drew %s in %.2f s", self.folder / name, time.perf_counter() - started)

"""The report of ``cppo audit``: ``audit.md``, ``audit.json`` and a self-contained ``audit.html``.

The markdown and the page give, per transform, its verdict and the numbers behind it (accuracy under
``I``, the view and grey; k3 and exact KL to ``I``; entropy shift; positions between the identity and the
grey floor), the verdicts per group of questions, the entropy-shift statistics CPPO's perception tokens
depend on, the CPL direction of every ``(I+, I-)`` pair and of the pools as configured, and the proposed
pools (as YAML for a data config). The page also shows, per transform, a few example views beside the
original with the completions sampled under each (all model text HTML-escaped).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from cppo_lightning.audit.verdicts import AuditResult
from cppo_lightning.audit.views import ALL, GREY, NEUTRAL_CPL, POOL, pair_key
from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING

__all__ = ["audit_html", "audit_markdown", "proposed_pools_yaml", "write_audit_report"]

_POOL_NAMES = {PRESERVING: "I+", REMOVING: "I-"}


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _small(value: float | None) -> str:
    """Divergences span orders of magnitude: 4 significant digits."""
    if value is None:
        return "-"
    return f"{value:.4g}"


def _misplaced_groups(result: AuditResult, name: str) -> list[str]:
    return [
        group for group in result.groups if group != ALL and result.verdicts[group][name].label == "misplaced"
    ]


def _transform_rows(result: AuditResult, group: str) -> list[list[str]]:
    """One row per pool transform (candidates included): the verdict and the numbers behind it."""
    figures, verdicts = result.figures[group], result.verdicts[group]
    identity, floor = figures[ORIGINAL], figures[GREY]
    rows = []
    for role in (PRESERVING, REMOVING):
        for view in result.transforms(role):
            values, verdict = figures[view.name], verdicts[view.name]
            label = view.label + (" (candidate)" if view.candidate else "")
            rows.append(
                [
                    _POOL_NAMES[role],
                    f"`{view.name}` {label}",
                    f"{view.probability:g}",
                    f"**{verdict.label}**",
                    f"{_number(identity.accuracy)} / {_number(values.accuracy)} / {_number(floor.accuracy)}",
                    f"{_small(values.kl)} / {_small(floor.kl)}",
                    _small(values.k3),
                    _small(values.entropy_shift),
                    f"{_number(verdict.accuracy_position, 2)} / {_number(verdict.divergence_position, 2)}",
                    ", ".join(_misplaced_groups(result, view.name)) if group == ALL else "",
                ]
            )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


_TRANSFORM_HEADER = [
    "pool",
    "transform",
    "p",
    "verdict",
    "accuracy I / view / grey",
    "KL view / grey",
    "k3",
    "dH",
    "position acc / KL",
    "misplaced for",
]


def proposed_pools_yaml(result: AuditResult, configs: dict[str, dict[str, Any]]) -> str | None:
    """The proposal as the data config's ``preserving_pool`` / ``removing_pool`` (None if a pool is empty).

    Args:
        result: the audit.
        configs: view name -> ``{class_path, init_args}`` of its transform (``AuditViewMaker.configs``).
    """
    proposal = result.proposal
    if not proposal["complete"]:
        return None
    pools = {
        f"{role}_pool": {
            "class_path": "datamodules.PerturbationPool",
            "init_args": {"view": role, "transforms": [configs[name] for name in proposal[role]]},
        }
        for role in (PRESERVING, REMOVING)
    }
    return yaml.safe_dump({"data": {"init_args": pools}}, sort_keys=False, width=110)


def audit_markdown(result: AuditResult, configs: dict[str, dict[str, Any]] | None = None) -> str:
    """The report as markdown."""
    settings = result.settings
    lines = [f"# Perturbation-pool audit: {settings.get('config', '')}", ""]
    lines.append(
        f"Policy `{settings.get('model', '?')}`; {settings['questions']} questions of the "
        f"{settings.get('split', '?')} split; accuracy as {settings['accuracy']} (temperature "
        f"{settings['temperature']:g}, up to {settings['max_new_tokens']} new tokens, grader "
        f"`{settings.get('grader', '?')}`); divergences and entropies on the {settings['samples_per_question']} "
        f"completions per question sampled under I; CPPO's rho {settings['top_ratio']:g}, tau "
        f"{settings['tau']:g}, advantage gating {'on' if settings['advantage_gating'] else 'off'}. "
        f"{_number(settings.get('seconds'), 0)} s on {settings.get('device', '?')} "
        f"({_number(settings.get('cpu_seconds'), 0)} s of CPU time)."
    )
    lines += ["", "## Verdicts over all questions", ""]
    lines += _table(_TRANSFORM_HEADER, _transform_rows(result, ALL))
    lines += [
        "",
        "Accuracy: avg@k; KL: mean exact KL(pi(.|I) || pi(.|view)) per response token; k3: the CPL's "
        "sampled-token estimate of it; dH: mean H(view) - H(I); position: 0 = as with the original image, "
        "1 = as with flat grey, by accuracy and by KL (`-`: not defined, see the rule below). Each transform "
        "is applied (p = 1); `p` is its probability in the pool.",
    ]
    for group in result.groups[1:]:
        figures = result.figures[group]
        lines += [
            "",
            f"## {group} ({figures[ORIGINAL].questions} questions)",
            "",
        ]
        rows = [row[:-1] for row in _transform_rows(result, group)]
        lines += _table(_TRANSFORM_HEADER[:-1], rows)
    lines += ["", "## Entropy shift of each view, as I- (all questions)", ""]
    rows = []
    for view in result.views:
        if view.role == POOL and view.pool == PRESERVING:
            continue
        values = result.figures[ALL][view.name]
        rows.append(
            [
                f"`{view.name}` {view.label}",
                _number(values.positive_shift_fraction),
                _number(values.perception_fraction),
                _number(values.concentration),
                _small(values.entropy_shift),
            ]
        )
    lines += _table(["view", "tokens with dH > 0", "perception fraction", "concentration", "mean dH"], rows)
    lines += [
        "",
        "Perception fraction: response tokens CPPO would select with this view as I- (no gating); "
        "concentration: the share of the entropy rise those tokens carry.",
    ]
    lines += ["", "## Expected CPL direction", ""]
    configured = result.configured.get(ALL)
    if configured is not None:
        lines.append(_direction_sentence("The pools as configured", configured))
        for group in result.groups[1:]:
            lines.append(f"- {group}: {_direction_text(result.configured[group])}")
    preserving, removing = result.transforms(PRESERVING), result.transforms(REMOVING)
    if preserving and removing:
        lines += [
            "",
            "CPL direction of each pair (share of perception tokens with D+ < D-, ties counted half; all "
            "questions):",
            "",
        ]
        header = ["I+ \\ I-", *(f"`{r.name}` {r.label}" for r in removing)]
        rows = [
            [
                f"`{p.name}` {p.label}",
                *(_number(result.pairs[ALL][pair_key(p.name, r.name)].direction) for r in removing),
            ]
            for p in preserving
        ]
        lines += _table(header, rows)
    lines += ["", "## Proposed pools", ""]
    proposal = result.proposal
    for role in (PRESERVING, REMOVING):
        kept = ", ".join(f"`{name}` {result.view(name).label}" for name in proposal[role]) or "none"
        lines.append(f"- {_POOL_NAMES[role]}: {kept}")
    for name, reason in proposal["dropped"].items():
        lines.append(f"- dropped `{name}` {result.view(name).label}: {reason}")
    if proposal["complete"]:
        current = _number(configured.direction) if configured is not None else "-"
        lines.append(
            f"- expected CPL direction of the proposal {_number(proposal['direction'])} "
            f"(the pools as configured: {current})"
        )
        snippet = proposed_pools_yaml(result, configs) if configs else None
        if snippet:
            lines += ["", "```yaml", snippet.rstrip(), "```"]
    else:
        empty = [_POOL_NAMES[role] for role in (PRESERVING, REMOVING) if not proposal[role]]
        lines.append(
            f"- no proposal: no audited transform qualifies for {' and '.join(empty)}; audit candidates "
            "(`--candidates`)"
        )
    rule = result.rule
    lines += [
        "",
        "## The verdict rule",
        "",
        "position = max(accuracy position, KL position), where accuracy position = (acc(I) - acc(view)) / "
        f"(acc(I) - acc(grey)) when acc(I) - acc(grey) >= {rule.min_accuracy_gap:g}, and KL position = "
        f"KL(view) / KL(grey) when KL(grey) >= {rule.min_floor_divergence:g}. An I+ transform is preserving at "
        f"position <= {rule.preserving_max:g} and misplaced (removes what the task needs) at >= "
        f"{rule.removing_min:g}; an I- transform is removing at >= {rule.removing_min:g} and misplaced (leaves "
        f"it) at <= {rule.preserving_max:g}; partial in between; inconclusive when neither position is defined "
        "(the policy does not read the image). The proposal keeps the transforms whose verdict over all "
        "questions is their pool's and that no group calls misplaced (nor, for I+, partial).",
        "",
    ]
    return "\n".join(lines)


def _direction_text(pair) -> str:
    if pair.direction is None:
        return "no perception tokens"
    return (
        f"direction {pair.direction:.3f} over {pair.tokens} perception tokens (share with D+ < D-, ties counted "
        f"half; {pair.ties:.3f} tie) (mean D+ {pair.d_plus:.4g}, D- {pair.d_minus:.4g}; CPL {pair.cpl:.3f} vs "
        f"neutral log 2 = {NEUTRAL_CPL:.3f})"
    )


def _direction_sentence(subject: str, pair) -> str:
    text = _direction_text(pair)
    if pair.direction is None:
        return f"{subject}: {text}."
    if pair.direction == 0.5:
        by_count = "no direction by count (as many tokens each way, or all tied)"
    else:
        way = "the right way" if pair.direction > 0.5 else "**the wrong way**"
        by_count = f"by count, the CPL pushes {way} on most perception tokens"
    if pair.d_plus > pair.d_minus:
        by_size = "by size, **the wrong way**: the outputs move more under I+ than under I- on average"
    else:
        by_size = "by size, the right way: the outputs move less under I+ than under I- on average"
    return f"{subject}: {text}. {by_count[0].upper()}{by_count[1:]}; {by_size}."


# ---------------------------------------------------------------------------------------------- HTML


def _png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; vertical-align: top; }
.preserving, .removing { background: #e3f4e1; } .misplaced { background: #f9d6d2; }
.partial { background: #fcefc7; } .inconclusive { background: #eee; }
section.view { border-top: 1px solid #aaa; padding: 0.5em 0; }
.examples { display: flex; flex-wrap: wrap; gap: 1.5em; }
.example figure { display: inline-block; margin: 0 0.3em 0 0; text-align: center; }
.example img { width: 160px; image-rendering: pixelated; border: 1px solid #ddd; }
.completion { font-family: monospace; white-space: pre-wrap; max-width: 340px; font-size: 90%; }
"""


def audit_html(result: AuditResult, markdown: str | None = None) -> str:
    """A self-contained page (images as data URIs); every text from the model or the data is escaped."""
    e = html.escape
    settings = result.settings
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>pool audit {e(str(settings.get('config', '')))}</title><style>{_CSS}</style></head><body>",
        f"<h1>Perturbation-pool audit: {e(str(settings.get('config', '')))}</h1>",
        f"<p>{e(_settings_line(settings))}</p>",
    ]
    configured = result.configured.get(ALL)
    if configured is not None:
        parts.append(f"<p><b>{e(_direction_sentence('The pools as configured', configured))}</b></p>")
    for group in result.groups:
        title = "all questions" if group == ALL else f"{group}"
        parts.append(f"<h2>Verdicts: {e(title)}</h2>")
        parts.append(
            _html_table(_TRANSFORM_HEADER[:-1], [row[:-1] for row in _transform_rows(result, group)])
        )
    proposal = result.proposal
    parts.append("<h2>Proposed pools</h2><ul>")
    for role in (PRESERVING, REMOVING):
        kept = ", ".join(f"{name} {result.view(name).label}" for name in proposal[role]) or "none"
        parts.append(f"<li>{_POOL_NAMES[role]}: {e(kept)}</li>")
    for name, reason in proposal["dropped"].items():
        parts.append(f"<li>dropped {e(name)} {e(result.view(name).label)}: {e(reason)}</li>")
    parts.append(f"<li>expected CPL direction of the proposal: {_number(proposal['direction'])}</li></ul>")
    parts.append("<h2>Each view, with examples</h2>")
    for view in result.views:
        values = result.figures[ALL][view.name]
        verdict = result.verdicts[ALL].get(view.name)
        label = verdict.label if verdict is not None else view.role
        parts.append(f'<section class="view" data-view="{e(view.name)}">')
        parts.append(
            f'<h3>{e(view.name)}: {e(view.label)} <span class="{e(label)}">{e(label)}</span></h3>'
            f"<p><code>{e(view.description)}</code></p>"
        )
        numbers = [
            ("accuracy", _number(values.accuracy)),
            ("k3", _small(values.k3)),
            ("KL", _small(values.kl)),
            ("dH", _small(values.entropy_shift)),
            ("tokens with dH > 0", _number(values.positive_shift_fraction)),
            ("perception fraction (as I-)", _number(values.perception_fraction)),
            ("concentration", _number(values.concentration)),
        ]
        if verdict is not None:
            numbers.append(("why", verdict.reason))
        parts.append(_html_table([key for key, _ in numbers], [[value for _, value in numbers]]))
        parts.append('<div class="examples">')
        for example in result.examples:
            parts.append(_html_example(example, view.name))
        parts.append("</div></section>")
    parts.append("<h2>Report (markdown)</h2>")
    if markdown:
        parts.append(f'<pre class="completion" style="max-width:none">{e(markdown)}</pre>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _settings_line(settings: dict[str, Any]) -> str:
    return (
        f"policy {settings.get('model', '?')}; {settings['questions']} questions of the "
        f"{settings.get('split', '?')} split; accuracy as {settings['accuracy']} at temperature "
        f"{settings['temperature']:g}; {_number(settings.get('seconds'), 0)} s on {settings.get('device', '?')}"
    )


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    e = html.escape

    def cell(text: str) -> str:
        text = str(text)
        plain = text.replace("**", "").replace("`", "")
        css = plain if plain in ("preserving", "removing", "misplaced", "partial", "inconclusive") else ""
        return f'<td class="{css}">{e(plain)}</td>' if css else f"<td>{e(plain)}</td>"

    head = "".join(f"<th>{e(name)}</th>" for name in header)
    body = "".join("<tr>" + "".join(cell(value) for value in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html_example(example: dict[str, Any], view: str) -> str:
    e = html.escape
    parts = ['<div class="example">']
    for name in (ORIGINAL, view):
        image = example["images"].get(name)
        if image is not None:
            caption = "I (original)" if name == ORIGINAL else name
            parts.append(
                f'<figure><img alt="{e(name)}" src="{_png_data_uri(image)}"><figcaption>{e(caption)}'
                "</figcaption></figure>"
            )
    parts.append(
        f"<p>{e(str(example['id']))} ({e(str(example['group']))}): {e(example['question'])} "
        f"&rarr; reference {e(example['answer'])}</p>"
    )
    for name in (ORIGINAL, view):
        completion = example["completions"].get(name)
        if completion is not None:
            caption = "under I" if name == ORIGINAL else f"under {name}"
            parts.append(
                f"<p>{e(caption)} (grade {completion['correct']:g}):</p>"
                f'<div class="completion">{e(completion["text"])}</div>'
            )
    parts.append("</div>")
    return "".join(parts)


def write_audit_report(
    result: AuditResult, folder: str | Path, configs: dict[str, dict[str, Any]] | None = None
) -> dict[str, Path]:
    """Write ``audit.md``, ``audit.json`` and ``audit.html`` to ``folder``.

    Args:
        result: the audit.
        folder: the run folder (created).
        configs: view name -> its transform's ``{class_path, init_args}`` (the proposal's YAML).

    Returns:
        ``{"markdown", "json", "html"}`` -> path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    markdown = audit_markdown(result, configs)
    paths = {"markdown": folder / "audit.md", "json": folder / "audit.json", "html": folder / "audit.html"}
    paths["markdown"].write_text(markdown)
    content = result.to_dict()
    content["proposal"] = {
        **content["proposal"],
        "yaml": proposed_pools_yaml(result, configs) if configs else None,
    }
    paths["json"].write_text(json.dumps(content, indent=2, default=str) + "\n")
    paths["html"].write_text(audit_html(result, markdown))
    return paths

"""The audit's report: the three files, model text escaped in the page, the proposed pools as loadable YAML."""

import json

import albumentations as A
import numpy as np
import yaml

from cppo_lightning.audit import (
    ALL,
    GREY,
    AuditResult,
    AuditView,
    PairFigures,
    VerdictRule,
    ViewFigures,
    pair_key,
    propose_pools,
)
from cppo_lightning.audit.report import write_audit_report
from cppo_lightning.batch import ORIGINAL
from datamodules.perturbations import PerturbationPool, RandomZoomCrop
from datamodules.pool_audit import transform_config

HOSTILE = '<script>alert("x")</script> & \\boxed{<b>red</b>}'


def hand_made_result():
    """Colour jitter that is misplaced for colour questions, a rotation that preserves, a removing crop."""
    views = [
        AuditView("preserving:0", "preserving", "ColorJitter", "ColorJitter(...)"),
        AuditView("preserving:1", "preserving", "Rotate", "Rotate(...)"),
        AuditView("removing:0", "removing", "RandomZoomCrop", "RandomZoomCrop(...)"),
        AuditView(GREY, "floor", "flat grey"),
        AuditView("pool:preserving", "pool", "preserving pool as configured", pool="preserving"),
        AuditView("pool:removing", "pool", "removing pool as configured", pool="removing"),
    ]
    by_group = {
        # colour questions: the jitter costs (0.9 - 0.5) / (0.9 - 0.25) = 0.62 of the accuracy
        "colour_of": {ORIGINAL: ViewFigures(10, 0.9), GREY: ViewFigures(10, 0.25, kl=0.3),
                      "preserving:0": ViewFigures(10, 0.5, kl=0.05), "preserving:1": ViewFigures(10, 0.88, kl=0.01),
                      "removing:0": ViewFigures(10, 0.3, kl=0.2)},
        # counting: nothing reads the image
        "count": {ORIGINAL: ViewFigures(10, 0.8), GREY: ViewFigures(10, 0.8, kl=1e-4),
                  "preserving:0": ViewFigures(10, 0.8, kl=1e-5), "preserving:1": ViewFigures(10, 0.8, kl=1e-5),
                  "removing:0": ViewFigures(10, 0.8, kl=1e-5)},
    }  # fmt: skip
    by_group[ALL] = {
        name: ViewFigures(20, (by_group["colour_of"][name].accuracy + by_group["count"][name].accuracy) / 2,
                          kl=(by_group["colour_of"][name].kl + by_group["count"][name].kl) / 2)
        for name in by_group["colour_of"]
    }  # fmt: skip
    for group in by_group.values():
        group["pool:preserving"] = group["pool:removing"] = ViewFigures(10, None)
    rule = VerdictRule()
    verdicts = {
        group: {view.name: rule.verdict(view.role, figures[view.name], figures[ORIGINAL], figures[GREY])
                for view in views if view.role in ("preserving", "removing")}
        for group, figures in by_group.items()
    }  # fmt: skip
    pairs = {
        group: {pair_key(p, "removing:0"): PairFigures(direction=d, d_plus=0.01, d_minus=0.02, cpl=0.6, tokens=5)
                for p, d in (("preserving:0", 0.3), ("preserving:1", 0.9))}
        for group in by_group
    }  # fmt: skip
    configured = {group: PairFigures(0.45, 0.011, 0.007, 0.78, 40) for group in by_group}
    image = np.zeros((8, 8, 3), np.uint8)
    examples = [
        {
            "id": "ex<1>",
            "question": "What colour is the <circle>?",
            "answer": "red",
            "group": "colour_of",
            "images": {
                name: image for name in (ORIGINAL, "preserving:0", "preserving:1", "removing:0", GREY)
            },
            "completions": {
                ORIGINAL: {"text": HOSTILE, "correct": 1.0},
                "preserving:0": {"text": "x", "correct": 0.0},
            },
        }
    ]
    settings = {"questions": 20, "samples_per_question": 2, "temperature": 1.0, "max_new_tokens": 8,
                "accuracy": "sampled avg@2", "top_ratio": 0.5, "tau": 0.1, "advantage_gating": True,
                "config": "configs/demo/cppo.yaml", "model": "tiny", "split": "train", "seconds": 1.0}  # fmt: skip
    return AuditResult(
        views=views,
        groups=[ALL, "colour_of", "count"],
        figures=by_group,
        verdicts=verdicts,
        pairs=pairs,
        configured=configured,
        proposal=propose_pools(views, verdicts, pairs),
        rule=rule,
        settings=settings,
        examples=examples,
    )


def test_the_report_files_and_what_they_say(tmp_path):
    result = hand_made_result()
    configs = {
        "preserving:0": transform_config(A.ColorJitter(brightness=(0.2, 1.3), p=1.0)),
        "preserving:1": transform_config(A.Rotate(limit=(-10, 10), p=1.0)),
        "removing:0": transform_config(RandomZoomCrop(scale_range=(0.6, 0.7))),
    }
    paths = write_audit_report(result, tmp_path / "run", configs)
    assert {path.name for path in paths.values()} == {"audit.md", "audit.json", "audit.html"}
    assert all(path.parent == tmp_path / "run" for path in paths.values())
    markdown = paths["markdown"].read_text()
    # The jitter: misplaced for the colour questions, which the overall row names.
    assert result.verdicts["colour_of"]["preserving:0"].label == "misplaced"
    row = next(line for line in markdown.splitlines() if "`preserving:0` ColorJitter" in line)
    assert row.endswith("| colour_of |")
    assert "direction 0.450 over 40 perception tokens" in markdown
    # 0.45 < 0.5 and D+ 0.011 > D- 0.007: wrong by count and by size.
    assert "By count, the CPL pushes **the wrong way**" in markdown
    assert "by size, **the wrong way**" in markdown
    assert "dropped `preserving:0` ColorJitter: misplaced for colour_of" in markdown
    report = json.loads(paths["json"].read_text())
    assert report["proposal"]["preserving"] == ["preserving:1"]
    assert report["proposal"]["removing"] == ["removing:0"]
    assert report["configured_pools"][ALL]["direction"] == 0.45
    assert report["examples"][0]["completions"]["original"]["text"] == HOSTILE  # JSON keeps the text as is

    # The proposal is a data config's pools: it loads back into the same transforms.
    pools = yaml.safe_load(report["proposal"]["yaml"])["data"]["init_args"]
    from lightning.pytorch.cli import instantiate_class

    transforms = [instantiate_class((), spec) for spec in pools["removing_pool"]["init_args"]["transforms"]]
    pool = PerturbationPool(transforms, view=pools["removing_pool"]["init_args"]["view"])
    assert repr(pool.transforms[0]) == repr(RandomZoomCrop(scale_range=(0.6, 0.7)))
    assert "```yaml" in markdown


def test_the_page_escapes_model_and_data_text(tmp_path):
    page = write_audit_report(hand_made_result(), tmp_path)["html"].read_text()
    assert "<script>" not in page and "<b>red</b>" not in page and "<circle>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; \\boxed{&lt;b&gt;red&lt;/b&gt;}" in page
    assert "ex&lt;1&gt;" in page
    # Per transform a section with the original beside the view, as embedded PNGs.
    assert page.count('<section class="view"') == 6
    assert page.count('src="data:image/png;base64,') >= 8

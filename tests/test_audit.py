"""The pool audit: its verdict rule and token statistics on hand-made figures, and `cppo audit` on a tiny
model for a constructed case whose answer is known (an identity I+ and a flat-grey I-)."""

import json
import math

import pytest
import torch
import yaml

from cli import main
from cppo_lightning.audit import (
    ALL,
    GREY,
    AuditView,
    PairFigures,
    SharedNoiseSampler,
    Verdict,
    VerdictRule,
    ViewFigures,
    pair_key,
    pair_token_sums,
    propose_pools,
    view_token_sums,
)
from cppo_lightning.batch import ORIGINAL
from datamodules.pool_audit import load_candidates, transform_config
from helpers import ROOT

RULE = VerdictRule()  # preserving <= 0.25 < partial < 0.5 <= removing, gap 0.1, floor KL 1e-3
# With the image 0.9, with grey 0.3: the accuracy scale spans 0.6. KL under grey: 0.2 per token.
IDENTITY = ViewFigures(accuracy=0.9)
FLOOR = ViewFigures(accuracy=0.3, kl=0.2)


@pytest.mark.parametrize(
    ("role", "accuracy", "kl", "label", "position"),
    [
        # acc position (0.9 - 0.87) / 0.6 = 0.05, KL position 0.02 / 0.2 = 0.1 -> max 0.1
        ("preserving", 0.87, 0.02, "preserving", 0.1),
        # the colour-jitter case: accuracy halfway to grey, (0.9 - 0.6) / 0.6 = 0.5 -> misplaced
        ("preserving", 0.6, 0.02, "misplaced", 0.5),
        # accuracy intact but the distributions moved: KL position 0.07 / 0.2 = 0.35 -> partial
        ("preserving", 0.9, 0.07, "partial", 0.35),
        # exactly at the bound: 0.05 / 0.2 = 0.25 is still preserving
        ("preserving", 0.9, 0.05, "preserving", 0.25),
        # I-: accuracy (0.9 - 0.35) / 0.6 = 0.9167 -> removing
        ("removing", 0.35, 0.05, "removing", 0.55 / 0.6),
        # I- that leaves the information: 0.0333 and 0.05 -> misplaced
        ("removing", 0.88, 0.01, "misplaced", 0.05),
        # I- halfway by KL only: 0.1 / 0.2 = 0.5 -> removing (either measure suffices)
        ("removing", 0.9, 0.1, "removing", 0.5),
        # I- in between: 0.06 / 0.2 = 0.3 -> partial
        ("removing", 0.9, 0.06, "partial", 0.3),
    ],
)
def test_verdict_rule_on_hand_made_figures(role, accuracy, kl, label, position):
    verdict = RULE.verdict(role, ViewFigures(accuracy=accuracy, kl=kl), IDENTITY, FLOOR)
    assert verdict.label == label
    assert verdict.position == pytest.approx(position)
    assert verdict.accuracy_position == pytest.approx((0.9 - accuracy) / 0.6)
    assert verdict.divergence_position == pytest.approx(kl / 0.2)


def test_verdict_rule_uses_only_the_measures_that_are_defined():
    # Grey costs 0.05 of accuracy (< 0.1): only the KL position counts, 0.12 / 0.2 = 0.6.
    close_floor = ViewFigures(accuracy=0.85, kl=0.2)
    verdict = RULE.verdict("preserving", ViewFigures(accuracy=0.5, kl=0.12), IDENTITY, close_floor)
    assert verdict.accuracy_position is None and verdict.label == "misplaced"
    assert verdict.position == pytest.approx(0.6)
    # Grey moves neither accuracy nor the distributions (KL 5e-4 < 1e-3): the policy does not read the image.
    blind = ViewFigures(accuracy=0.88, kl=5e-4)
    verdict = RULE.verdict("removing", ViewFigures(accuracy=0.2, kl=4e-4), IDENTITY, blind)
    assert (verdict.label, verdict.position) == ("inconclusive", None)
    assert "does not read the image" in verdict.reason
    # Not sampled (accuracy None): KL alone.
    verdict = RULE.verdict("removing", ViewFigures(kl=0.18), ViewFigures(), FLOOR)
    assert verdict.label == "removing" and verdict.position == pytest.approx(0.9)


def test_verdict_rule_rejects_bad_thresholds_and_roles():
    with pytest.raises(ValueError, match="preserving_max < removing_min"):
        VerdictRule(preserving_max=0.6, removing_min=0.5)
    with pytest.raises(ValueError, match="role 'floor'"):
        RULE.verdict("floor", FLOOR, IDENTITY, FLOOR)


def test_view_token_sums_hand_computed():
    # One row, 4 response tokens and 1 padding position.
    lp = torch.tensor([[-1.0, -1.0, -2.0, -0.5, 0.0]])
    lp_view = torch.tensor([[-1.0, -1.5, -1.0, -0.5, 9.0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 5.0]])
    entropy_view = torch.tensor([[1.2, 0.9, 1.4, 1.1, 0.0]])  # dH = 0.2, -0.1, 0.4, 0.1 (padding ignored)
    kl = torch.tensor([[0.0, 0.1, 0.3, 0.0, 7.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    sums = view_token_sums(lp, lp_view, entropy, entropy_view, kl, mask, top_ratio=0.5)
    # k3 = e^d - d - 1 with d = lp_view - lp: 0, e^-0.5 - 0.5 = 0.106531, e^1 - 2 = 0.718282, 0.
    assert sums["k3"].item() == pytest.approx(0.106531 + 0.718282, abs=1e-5)
    assert sums["kl"].item() == pytest.approx(0.4)
    assert sums["tokens"].item() == 4
    assert sums["entropy_shift"].item() == pytest.approx(0.6)
    # Three tokens rise; CPPO keeps floor(0.5 * 3) = 1 of them, the largest relative rise 0.4 / 1.4.
    assert sums["positive_shift"].item() == 3
    assert sums["perception"].item() == 1
    assert sums["rise"].item() == pytest.approx(0.7)
    assert sums["rise_perception"].item() == pytest.approx(0.4)  # concentration 0.4 / 0.7


def test_pair_token_sums_hand_computed():
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    lp_plus = torch.tensor([[-1.0, -0.5, -1.0], [-1.0, -1.0, -1.0]])
    lp_minus = torch.tensor([[-1.5, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    entropy = torch.ones(2, 3)
    # Row 0: two tokens rise by 1.0; CPPO keeps floor(0.5 * 2) = 1, but the two are tied, so both. Row 1
    # has A < 0: gated out.
    entropy_minus = torch.tensor([[2.0, 2.0, 0.5], [2.0, 2.0, 2.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    sums = pair_token_sums(
        lp, lp_plus, lp_minus, entropy, entropy_minus, mask, torch.tensor([1.0, -1.0]), 0.5, 0.1
    )
    assert sums["tokens"].tolist() == [2.0, 0.0]
    # Token 0: D+ = 0 < D- = k3(-0.5) = 0.106531; token 1: D+ = k3(0.5) = 0.148721 > D- = 0.
    assert sums["direction"].tolist() == [1.0, 0.0]
    assert sums["d_plus"][0].item() == pytest.approx(0.148721, abs=1e-5)
    assert sums["d_minus"][0].item() == pytest.approx(0.106531, abs=1e-5)
    # softplus(-1.06531) + softplus(1.48721) = 0.296113 + 1.690971 (the CPL's own hand-computed values)
    assert sums["cpl"][0].item() == pytest.approx(0.296113 + 1.690971, abs=1e-5)
    assert sums["ties"].tolist() == [0.0, 0.0]
    ungated = pair_token_sums(lp, lp_plus, lp_minus, entropy, entropy_minus, mask, None, 0.5, 0.1)
    assert ungated["tokens"].tolist() == [2.0, 3.0]
    # Row 1 ungated: D+ = 0 < D- = k3(-1) on all three tokens.
    assert ungated["direction"].tolist() == [1.0, 3.0]
    # Identity I+ and I-: every token ties (D+ = D- = 0) and counts half, direction 0.5 (no signal).
    tied = pair_token_sums(lp, lp, lp, entropy, entropy_minus, mask, None, 0.5, 0.1)
    assert tied["ties"].tolist() == tied["tokens"].tolist() == [2.0, 3.0]
    assert tied["direction"].tolist() == [1.0, 1.5]


def verdict(label):
    return Verdict(label, None, None, None, "")


def test_propose_pools_keeps_what_every_group_accepts():
    views = [
        AuditView("preserving:0", "preserving", "ColorJitter"),
        AuditView("preserving:1", "preserving", "Rotate"),
        AuditView("removing:0", "removing", "CoarseDropout"),
        AuditView("removing:candidate:0", "removing", "ToGray", candidate=True),
        AuditView(GREY, "floor", "flat grey"),
    ]
    verdicts = {
        # Over all questions the jitter looks harmless, but it is misplaced for the colour questions.
        ALL: {"preserving:0": verdict("preserving"), "preserving:1": verdict("preserving"),
              "removing:0": verdict("misplaced"), "removing:candidate:0": verdict("removing")},
        "colour_of": {"preserving:0": verdict("misplaced"), "preserving:1": verdict("preserving"),
                      "removing:0": verdict("misplaced"), "removing:candidate:0": verdict("removing")},
        "count": {"preserving:0": verdict("preserving"), "preserving:1": verdict("inconclusive"),
                  "removing:0": verdict("partial"), "removing:candidate:0": verdict("removing")},
    }  # fmt: skip
    pairs = {ALL: {pair_key("preserving:1", "removing:candidate:0"): PairFigures(direction=0.8, tokens=10)}}
    proposal = propose_pools(views, verdicts, pairs)
    assert proposal["preserving"] == ["preserving:1"]
    assert proposal["removing"] == ["removing:candidate:0"]
    assert proposal["dropped"] == {
        "preserving:0": "misplaced for colour_of",
        "removing:0": "misplaced for colour_of",
    }
    assert proposal["direction"] == pytest.approx(0.8) and proposal["complete"]
    # The demo's finding: the jitter only partial for the colour questions. An I+ partial anywhere is
    # dropped; an I- partial for a group (ToGray for counts) is kept.
    verdicts["colour_of"]["preserving:0"] = verdict("partial")
    verdicts["count"]["removing:candidate:0"] = verdict("partial")
    proposal = propose_pools(views, verdicts, pairs)
    assert proposal["dropped"]["preserving:0"] == "partial for colour_of"
    assert proposal["preserving"] == ["preserving:1"] and proposal["removing"] == ["removing:candidate:0"]
    # Nothing removes: no proposal, no direction.
    verdicts[ALL]["removing:candidate:0"] = verdict("partial")
    proposal = propose_pools(views, verdicts, pairs)
    assert not proposal["complete"] and proposal["direction"] is None


def test_shared_noise_sampler_samples_the_distribution_and_shares_its_noise():
    # Three copies of 20,000 rows whose next-token probabilities are 0.5, 0.3, 0.2 (temperature 1) and a
    # suppressed token: each copy is an exact sample of p (frequencies within 5 standard errors, 0.018),
    # and the copies pick the same tokens.
    probabilities = torch.tensor([0.5, 0.3, 0.2, 0.0])
    scores = probabilities.log().repeat(3 * 20_000, 1)
    sampler = SharedNoiseSampler(20_000, temperature=1.0, top_k=0, top_p=1.0, seed=7)
    tokens = sampler(None, scores).argmax(-1).view(3, 20_000)
    assert torch.equal(tokens[0], tokens[1]) and torch.equal(tokens[0], tokens[2])
    frequencies = torch.bincount(tokens[0], minlength=4).float() / 20_000
    assert torch.allclose(frequencies, probabilities, atol=0.018) and frequencies[3] == 0
    # Temperature 2 flattens p to p^(1/2) normalised; top-k 2 keeps the two most likely.
    warm = SharedNoiseSampler(20_000, temperature=2.0, top_k=2, top_p=1.0, seed=7)
    frequencies = torch.bincount(warm(None, scores[:20_000]).argmax(-1), minlength=4).float() / 20_000
    flat = torch.tensor([0.5**0.5, 0.3**0.5, 0.0, 0.0])
    assert torch.allclose(frequencies, flat / flat.sum(), atol=0.018)


# --------------------------------------------------------------------------------- the command, constructed case

IDENTITY_POOL = {"class_path": "datamodules.PerturbationPool", "init_args": {"view": "preserving",
                 "transforms": [{"class_path": "albumentations.NoOp"}]}}  # fmt: skip
# One hole as large as the 56 px image, filled with 128: the grey floor, as a transform of I-.
GREY_POOL = {"class_path": "datamodules.PerturbationPool", "init_args": {"view": "removing", "transforms": [
    {"class_path": "albumentations.CoarseDropout", "init_args": {"num_holes_range": [1, 1],
     "hole_height_range": [56, 56], "hole_width_range": [56, 56], "fill": 128, "p": 1.0}}]}}  # fmt: skip


@pytest.fixture(scope="module")
def constructed_audit(tiny_qwen, tmp_path_factory):
    """`cppo audit` in-process: identity I+, grey I-, a candidate, a grader whose value varies."""
    folder = tmp_path_factory.mktemp("audit")
    candidates = folder / "candidates.yaml"
    candidates.write_text(
        yaml.safe_dump({"preserving": [{"class_path": "albumentations.ToGray", "init_args": {"p": 1.0}}]})
    )
    args = [
        "audit",
        "--config",
        str(ROOT / "configs" / "demo" / "cppo.yaml"),
        "--model.policy.model_name_or_path",
        str(tiny_qwen),
        "--model.evaluation.reward",
        "helpers.varied_reward",
        "--model.reward_functions",
        '{"helpers.varied_reward": 1.0}',
        "--model.rollout.max_new_tokens",
        "8",
        "--data.init_args.task.image_size",
        "56",
        "--data.init_args.task.max_shapes",
        "1",
        "--data.init_args.train_size",
        "6",
        "--data.init_args.val_size",
        "0",
        "--data.init_args.preserving_pool",
        json.dumps(IDENTITY_POOL),
        "--data.init_args.removing_pool",
        json.dumps(GREY_POOL),
        "--examples",
        "6",
        "--samples",
        "2",
        "--batch-size",
        "3",
        "--candidates",
        str(candidates),
        "--min-floor-divergence",
        "0",
        "--output",
        str(folder / "report"),
    ]
    assert main(args) == 0
    return json.loads((folder / "report" / "audit.json").read_text()), folder / "report"


def test_identity_in_the_preserving_pool_changes_nothing(constructed_audit):
    report, _ = constructed_audit
    figures = report["figures"][ALL]
    original, identity = figures[ORIGINAL], figures["preserving:0"]
    assert report["settings"]["questions"] == 6 and identity["tokens"] > 0
    # Sampled with the same random numbers as the original: the same completions, the same grades.
    assert identity["accuracy"] == original["accuracy"]
    # Scored in the same stacked forward as the original: no divergence, no entropy shift.
    assert identity["kl"] < 1e-6 and identity["k3"] < 1e-6 and abs(identity["entropy_shift"]) < 1e-6
    # At the identity on the rule's scale (the floor's minimum KL is 0 here: a random tiny model reads
    # the image only a little).
    assert report["verdicts"][ALL]["preserving:0"]["divergence_position"] == pytest.approx(0, abs=1e-4)


def test_grey_in_the_removing_pool_gives_the_grey_floor(constructed_audit):
    report, _ = constructed_audit
    figures = report["figures"][ALL]
    grey, removing = figures[GREY], figures["removing:0"]
    assert grey["kl"] > 0  # the tiny random model's distributions do change without the image
    assert removing["accuracy"] == grey["accuracy"]
    for key in ("kl", "k3", "entropy_shift", "positive_shift_fraction", "perception_fraction"):
        assert removing[key] == pytest.approx(grey[key], rel=1e-4, abs=1e-7), key
    assert report["verdicts"][ALL]["removing:0"]["divergence_position"] == pytest.approx(1.0, rel=1e-4)


def test_pools_as_configured_are_the_single_transforms(constructed_audit):
    # Each pool holds one transform with p = 1: the configured draw is that transform's view, so the
    # configured CPL direction equals the pair's, token for token.
    report, _ = constructed_audit
    configured = report["configured_pools"][ALL]
    pair = report["pairs"][ALL][pair_key("preserving:0", "removing:0")]
    assert configured == pair
    if pair["tokens"]:
        # D+ = 0 (identity) and D- = the grey divergence >= 0: the loss agrees wherever D- > 0.
        assert pair["d_plus"] < 1e-6 and pair["direction"] > 0.5
    assert pair_key("preserving:candidate:0", "removing:0") in report["pairs"][ALL]
    assert [view["name"] for view in report["views"]] == [
        "preserving:0", "preserving:candidate:0", "removing:0", GREY, "pool:preserving", "pool:removing",
    ]  # fmt: skip


def test_report_files_and_groups(constructed_audit):
    report, folder = constructed_audit
    assert {path.name for path in folder.iterdir()} == {"audit.md", "audit.json", "audit.html"}
    markdown = (folder / "audit.md").read_text()
    assert "## Verdicts over all questions" in markdown and "## The verdict rule" in markdown
    assert "ToGray (candidate)" in markdown
    # The demo task's question families are the groups (counts add up to the questions).
    groups = [group for group in report["groups"] if group != ALL]
    assert groups and sum(report["figures"][group][ORIGINAL]["questions"] for group in groups) == 6
    assert math.isfinite(report["settings"]["seconds"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "audit").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_candidates_file_loads(path):
    candidates = load_candidates(path)
    assert candidates.get("preserving") and candidates.get("removing")
    for transforms in candidates.values():  # and each writes back as YAML a data config can hold
        yaml.safe_dump([transform_config(transform) for transform in transforms])


def test_pool_audit_from_module_takes_the_module_settings(tiny_qwen):
    """The audit samples, gates and budgets as the module trains (CPPO's defaults for a GRPO module)."""
    from cppo_lightning.audit import AuditView, PoolAudit
    from cppo_lightning.module import UpdateConfig
    from cppo_lightning.objectives import CPPO, GRPO
    from helpers import small_module

    grey = [AuditView("grey", "floor", "grey")]
    module = small_module(
        tiny_qwen, CPPO(top_ratio=0.3, tau=0.2), update=UpdateConfig(micro_batch_rollouts=6)
    )
    audit = PoolAudit.from_module(module, grey, group_key=None)
    assert (audit.top_ratio, audit.tau, audit.advantage_gating) == (0.3, 0.2, True)
    assert audit.samples == 4 and audit.max_rows == 6 and audit.seed == module.seed
    assert audit.grader is module.eval_grader and audit.reward_model is module.reward_model
    assert not audit.model.training and next(audit.model.parameters()).device.type == "cpu"
    defaults = CPPO()
    audit = PoolAudit.from_module(small_module(tiny_qwen, GRPO()), grey, samples=2)
    assert (audit.top_ratio, audit.tau, audit.samples) == (defaults.top_ratio, defaults.tau, 2)

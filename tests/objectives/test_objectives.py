"""Objective classes: hand-computed totals, the row-subset equivalence, gradients, errors, config."""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_lightning.objectives import (
    CPPO,
    GRPO,
    OBJECTIVES,
    PAPO,
    NonFiniteError,
    Objective,
    ObjectiveInputs,
    ViewOutputs,
    ViewRequest,
    build_objective,
)

DOCUMENTED_METRICS = {
    "loss", "policy_loss", "kl", "clip_fraction", "dual_clip_fraction", "ratio_mean", "entropy", "cpl",
    "divergence_preserving", "divergence_removing", "perception_fraction", "gated_fraction",
    "entropy_shift", "implicit_perception_loss", "double_entropy",
}  # fmt: skip


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


def all_rows(tensor, **kwargs):
    return ViewOutputs(rows=torch.arange(tensor.shape[0]), logprobs=tensor, **kwargs)


# ---------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------


def test_grpo_hand_computed_loss_metrics_and_gradient():
    # lp_old = lp (ratio 1), A = [1, -1], row 1 token 1 is padding:
    # pg = (-1 - 1 + 1) / 3 = -0.333333. k3 with ref - lp = 0.5: 0.148721 per token.
    # loss = -0.333333 + 0.5 * 0.148721 = -0.258973.
    logprobs = t([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=torch.tensor([[True, True], [True, False]]),
        advantages=t([1.0, -1.0]),
        ref_logprobs=torch.full((2, 2), -0.5),
        entropy=t([[2.0, 1.0], [3.0, 100.0]]),
    )
    loss, metrics = GRPO(beta=0.5)(inputs)
    torch.testing.assert_close(loss, t(-0.258973))
    torch.testing.assert_close(metrics["loss"], t(-0.258973))
    torch.testing.assert_close(metrics["policy_loss"], t(-1 / 3))
    torch.testing.assert_close(metrics["kl"], t(0.148721))
    torch.testing.assert_close(metrics["ratio_mean"], t(1.0))
    torch.testing.assert_close(metrics["entropy"], t(2.0))  # (2 + 1 + 3) / 3
    assert metrics["clip_fraction"].item() == 0.0
    # d/d lp: pg -A / 3 plus 0.5 * (1 - e^0.5) / 3 = -0.108120 from the KL:
    # row 0: -0.333333 - 0.108120 = -0.441454; row 1 t0: 0.333333 - 0.108120 = 0.225214.
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[-0.441454, -0.441454], [0.225214, 0.0]]))


def test_grpo_beta_zero_needs_no_reference():
    objective = GRPO(beta=0.0)
    assert not objective.needs_reference and not objective.needs_entropy
    assert objective.view_requests() == []
    assert not objective.view_rows(t([1.0, -1.0])).any()
    inputs = ObjectiveInputs(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), advantages=t([1.0]))
    loss, metrics = objective(inputs)
    torch.testing.assert_close(loss, t(-1.0))  # ratio 1, A = 1
    assert "kl" not in metrics
    with pytest.raises(ValueError, match=r"GRPO with beta=0.01 needs ObjectiveInputs.ref_logprobs"):
        GRPO()(inputs)


def test_objective_input_errors_name_the_tensor():
    objective = GRPO(beta=0.0)
    good = dict(
        logprobs=torch.zeros(2, 3),
        response_mask=torch.ones(2, 3, dtype=torch.bool),
        advantages=torch.zeros(2),
    )
    with pytest.raises(ValueError, match=r"response_mask has shape \(2, 2\) but logprobs has shape \(2, 3\)"):
        objective(ObjectiveInputs(**{**good, "response_mask": torch.ones(2, 2, dtype=torch.bool)}))
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        objective(ObjectiveInputs(**{**good, "advantages": torch.zeros(3)}))
    ref = torch.zeros(2, 3)
    ref[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="ref_logprobs has 1 non-finite value"):
        objective(ObjectiveInputs(**good, ref_logprobs=ref))
    with pytest.raises(NonFiniteError, match="^logprobs has 1 non-finite value"):
        objective(ObjectiveInputs(**{**good, "logprobs": ref}))


# ---------------------------------------------------------------------------------------------
# CPPO
# ---------------------------------------------------------------------------------------------


def test_cppo_hand_computed():
    # Row 0 (A = 1): H = 1, H^{I-} = [1.5, 3, 1] -> dH = [0.5, 2, 0]; eligible {0, 1},
    # s = [0.333, 0.667], k = max(1, floor(0.5 * 2)) = 1 -> perception token t1.
    # Row 1 (A = -1) is gated and gets no views.
    # At t1: D+ = 0, D- = k3(-1.5 - -1 = -0.5) = 0.106531 -> cpl = softplus(-1.06531) = 0.296113.
    # PG: ratio 1, tokens -1 x 3 and +1 x 3 -> 0. Loss = 0 + 1.0 * 0.296113.
    logprobs = torch.full((2, 3), -1.0, requires_grad=True)
    plus = torch.full((1, 3), -1.0, requires_grad=True)
    minus = t([[-1.0, -1.5, -1.0]], requires_grad=True)
    objective = CPPO(beta=0.0, cpl_weight=1.0)
    advantages = t([1.0, -1.0])
    assert objective.view_rows(advantages).tolist() == [True, False]
    rows = torch.tensor([0])
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=torch.ones(2, 3, dtype=torch.bool),
        advantages=advantages,
        entropy=torch.ones(2, 3),
        views={
            "preserving": ViewOutputs(rows, plus),
            "removing": ViewOutputs(rows, minus, entropy=t([[1.5, 3.0, 1.0]])),
        },
    )
    loss, metrics = objective(inputs)
    torch.testing.assert_close(loss, t(0.296113))
    torch.testing.assert_close(metrics["cpl"], t(0.296113))
    torch.testing.assert_close(metrics["divergence_removing"], t(0.106531))
    assert metrics["divergence_preserving"].item() == 0.0
    torch.testing.assert_close(metrics["perception_fraction"], t(1 / 6))  # one of six response tokens
    torch.testing.assert_close(metrics["gated_fraction"], t(0.5))  # one of two rows has A <= 0
    torch.testing.assert_close(metrics["entropy_shift"], t(2.5 / 3))  # (0.5 + 2 + 0) / 3, row 0 only
    loss.backward()
    # Only the perception token receives CPL gradient in the views; at t1, I+ agrees with I
    # (d = 0), where k3 is flat: d D+ / d lp+ = e^0 - 1 = 0.
    assert minus.grad.nonzero().tolist() == [[0, 1]]
    assert not plus.grad.any()


def test_cppo_view_requests_and_flags():
    objective = CPPO()
    assert objective.needs_reference and objective.needs_entropy and not objective.needs_full_distribution
    assert objective.view_requests() == [
        ViewRequest("preserving", with_grad=True),
        ViewRequest("removing", with_grad=True, entropy=True),
    ]
    assert CPPO(advantage_gating=False).view_rows(t([1.0, 0.0, -1.0])).tolist() == [True, True, True]
    assert CPPO().view_rows(t([1.0, 0.0, -1.0])).tolist() == [True, False, False]
    no_mask = CPPO(perception_mask=False, divergence="full_kl")
    assert not no_mask.needs_entropy and no_mask.needs_full_distribution
    assert all(r.full_distribution and not r.entropy for r in no_mask.view_requests())


def _random_cppo_case(seed, rows, length, advantages=None):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    lengths = torch.randint(1, length + 1, (rows,), generator=generator)
    response = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # right padding
    if advantages is None:
        advantages = randn(rows).round()  # plenty of exact zeros and negatives
    return dict(
        logprobs=-randn(rows, length).abs() - 0.1,
        old_logprobs=-randn(rows, length).abs() - 0.1,
        ref_logprobs=-randn(rows, length).abs() - 0.1,
        plus=-randn(rows, length).abs() - 0.1,
        minus=-randn(rows, length).abs() - 0.1,
        entropy=randn(rows, length).abs() * 2,
        entropy_removed=randn(rows, length).abs() * 2,
        response=response,
        advantages=advantages,
    )


def _run_cppo(objective, case, view_rows):
    """Loss, metrics and leaf gradients with views computed for ``view_rows`` only."""
    logprobs = case["logprobs"].clone().requires_grad_()
    plus = case["plus"][view_rows].clone().requires_grad_()
    minus = case["minus"][view_rows].clone().requires_grad_()
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=case["response"],
        advantages=case["advantages"],
        old_logprobs=case["old_logprobs"],
        ref_logprobs=case["ref_logprobs"],
        entropy=case["entropy"],
        views={
            "preserving": ViewOutputs(view_rows, plus),
            "removing": ViewOutputs(view_rows, minus, entropy=case["entropy_removed"][view_rows]),
        },
    )
    loss, metrics = objective(inputs)
    loss.backward()
    return loss, metrics, logprobs.grad, plus.grad, minus.grad


def _assert_subset_equals_all_rows(objective, case):
    num_rows = case["logprobs"].shape[0]
    everything = torch.arange(num_rows)
    subset = objective.view_rows(case["advantages"]).nonzero().flatten()
    loss_all, metrics_all, lp_all, plus_all, minus_all = _run_cppo(objective, case, everything)
    loss_sub, metrics_sub, lp_sub, plus_sub, minus_sub = _run_cppo(objective, case, subset)
    # Bitwise equal, not merely close: the subset path must be the release's computation.
    assert torch.equal(loss_sub, loss_all)
    assert metrics_sub.keys() == metrics_all.keys()
    for name in metrics_all:
        assert torch.equal(metrics_sub[name], metrics_all[name]), name
    assert torch.equal(lp_sub, lp_all)
    assert torch.equal(plus_sub, plus_all[subset]) and torch.equal(minus_sub, minus_all[subset])
    outside = torch.ones(num_rows, dtype=torch.bool)
    outside[subset] = False
    assert not plus_all[outside].any() and not minus_all[outside].any()
    return loss_all, plus_all, minus_all


@pytest.mark.parametrize("perception_mask", [True, False])
@pytest.mark.parametrize("rows,length,seed", [(1, 1, 0), (4, 7, 1), (8, 16, 2), (10, 33, 3), (16, 64, 4)])
def test_cppo_row_subset_gives_identical_loss_and_gradients(rows, length, seed, perception_mask):
    objective = CPPO(cpl_weight=0.5, perception_mask=perception_mask)
    _assert_subset_equals_all_rows(objective, _random_cppo_case(seed, rows, length))


def test_cppo_row_subset_with_every_row_gated():
    # All A <= 0: no rows need views, CPL is 0 but the graph still backpropagates.
    case = _random_cppo_case(5, 6, 9, advantages=t([0.0, -1.0, -0.5, 0.0, -2.0, -0.1]))
    loss, plus_grad, _ = _assert_subset_equals_all_rows(CPPO(), case)
    assert torch.isfinite(loss) and not plus_grad.any()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(1, 9),
    length=st.integers(1, 20),
    top_ratio=st.sampled_from([0.2, 0.5, 1.0]),
    perception_mask=st.booleans(),
)
def test_cppo_row_subset_property(seed, rows, length, top_ratio, perception_mask):
    objective = CPPO(top_ratio=top_ratio, perception_mask=perception_mask, cpl_weight=1.0)
    _assert_subset_equals_all_rows(objective, _random_cppo_case(seed, rows, length))


def test_cppo_gradients_reach_all_three_views_and_not_the_entropies():
    case = _random_cppo_case(7, 6, 12, advantages=t([1.0, 2.0, 0.5, 1.0, 1.0, 3.0]))
    entropy = case["entropy"].clone().requires_grad_()
    entropy_removed = case["entropy_removed"].clone().requires_grad_()
    logprobs = case["logprobs"].clone().requires_grad_()
    plus = case["plus"].clone().requires_grad_()
    minus = case["minus"].clone().requires_grad_()
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=case["response"],
        advantages=case["advantages"],
        ref_logprobs=case["ref_logprobs"],
        entropy=entropy,
        views={"preserving": all_rows(plus), "removing": all_rows(minus, entropy=entropy_removed)},
    )
    loss, metrics = CPPO(beta=0.0, cpl_weight=1.0)(inputs)
    # Isolate the CPL's own gradient on lp: subtract the policy-gradient part.
    loss.backward()
    assert plus.grad.abs().sum() > 0 and minus.grad.abs().sum() > 0
    assert entropy.grad is None and entropy_removed.grad is None
    pg_only = logprobs.detach().clone().requires_grad_()
    GRPO(beta=0.0)(ObjectiveInputs(pg_only, case["response"], case["advantages"]))[0].backward()
    assert not torch.equal(logprobs.grad, pg_only.grad)  # the CPL moves lp^I too
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_cppo_full_kl_subset_matches_all_rows():
    torch.manual_seed(3)
    rows, length, vocab = 5, 4, 6
    advantages = t([1.0, -1.0, 0.5, 0.0, 2.0])
    dists = [torch.log_softmax(torch.randn(rows, length, vocab), -1) for _ in range(3)]
    response = torch.ones(rows, length, dtype=torch.bool)
    objective = CPPO(beta=0.0, cpl_weight=1.0, divergence="full_kl", perception_mask=False)

    def run(view_rows):
        base, plus, minus = (d.clone().requires_grad_() for d in dists)
        logprobs = base.detach()[..., 0].clone().requires_grad_()
        views = {
            name: ViewOutputs(view_rows, dist[view_rows].detach()[..., 0], log_distribution=dist[view_rows])
            for name, dist in (("preserving", plus), ("removing", minus))
        }
        inputs = ObjectiveInputs(logprobs, response, advantages, log_distribution=base, views=views)
        loss, metrics = objective(inputs)
        loss.backward()
        return loss, base.grad, plus.grad

    loss_all, base_all, plus_all = run(torch.arange(rows))
    loss_sub, base_sub, plus_sub = run(torch.tensor([0, 2, 4]))
    torch.testing.assert_close(loss_sub, loss_all)
    torch.testing.assert_close(base_sub, base_all)
    torch.testing.assert_close(plus_sub, plus_all)
    assert plus_all.abs().sum() > 0 and loss_all > 0


def test_cppo_view_errors():
    case = _random_cppo_case(0, 3, 4, advantages=t([1.0, 1.0, -1.0]))
    base = dict(
        logprobs=case["logprobs"],
        response_mask=case["response"],
        advantages=case["advantages"],
        ref_logprobs=case["ref_logprobs"],
        entropy=case["entropy"],
    )
    removing = ViewOutputs(torch.tensor([0, 1]), case["minus"][:2], entropy=case["entropy_removed"][:2])
    with pytest.raises(ValueError, match="needs the 'preserving' view"):
        CPPO()(ObjectiveInputs(**base, views={"removing": removing}))
    only_row_0 = ViewOutputs(torch.tensor([0]), case["plus"][:1])
    with pytest.raises(ValueError, match=r"views\['preserving'\] lacks rows \[1\]"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": only_row_0, "removing": removing}))
    duplicated = ViewOutputs(torch.tensor([0, 0, 1]), case["plus"])
    with pytest.raises(ValueError, match="duplicates"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": duplicated, "removing": removing}))
    wrong_shape = ViewOutputs(torch.tensor([0, 1]), case["plus"])
    with pytest.raises(ValueError, match=r"views\['preserving'\].logprobs has shape \(3, 4\)"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": wrong_shape, "removing": removing}))
    nan_minus = case["minus"][:2].clone()
    nan_minus[1, 2] = float("nan")
    broken = ViewOutputs(torch.tensor([0, 1]), nan_minus, entropy=case["entropy_removed"][:2])
    preserving = ViewOutputs(torch.tensor([0, 1]), case["plus"][:2])
    with pytest.raises(NonFiniteError, match=r"views\['removing'\].logprobs has 1 non-finite value"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": preserving, "removing": broken}))
    no_entropy = ViewOutputs(torch.tensor([0, 1]), case["minus"][:2])
    with pytest.raises(ValueError, match=r"views\['removing'\].entropy"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": preserving, "removing": no_entropy}))
    with pytest.raises(ValueError, match="needs ObjectiveInputs.entropy"):
        CPPO()(ObjectiveInputs(**{**base, "entropy": None}))


# ---------------------------------------------------------------------------------------------
# PAPO
# ---------------------------------------------------------------------------------------------


def _papo_inputs(masked, rows=(0,)):
    logprobs = t([[-1.0, -2.0]], requires_grad=True)
    return logprobs, ObjectiveInputs(
        logprobs=logprobs,
        response_mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=t([0.0]),  # PG term is exactly 0
        views={"masked": ViewOutputs(torch.tensor(rows), masked)},
    )


def test_papo_hand_computed():
    # k3 at d = -1.5 - -1 = -0.5: 0.106531; at d = -1.5 - -2 = 0.5: 0.148721; token mean 0.127626.
    # Loss = -0.02 * 0.127626 = -0.00255252.
    masked = t([[-1.5, -1.5]], requires_grad=True)
    _, inputs = _papo_inputs(masked)
    loss, metrics = PAPO(beta=0.0)(inputs)
    torch.testing.assert_close(loss, t(-0.00255252))
    torch.testing.assert_close(metrics["implicit_perception_loss"], t(-0.127626))
    assert "double_entropy" not in metrics
    # Double entropy: 0.5 * mean(1, 2) + 0.1 * mean(1.5, 1.5) = 0.75 + 0.15 = 0.9 -> 0.897447.
    loss, metrics = PAPO(beta=0.0, entropy_weight_original=0.5, entropy_weight_masked=0.1)(inputs)
    torch.testing.assert_close(loss, t(0.897447))
    torch.testing.assert_close(metrics["double_entropy"], t(0.9))


def test_papo_masked_view_gradient_only_when_recomputed():
    assert PAPO().view_requests() == [ViewRequest("masked", with_grad=False)]
    assert PAPO(recompute_with_grad=True).view_requests() == [ViewRequest("masked", with_grad=True)]
    for recompute in (False, True):
        masked = t([[-1.5, -1.5]], requires_grad=True)
        logprobs, inputs = _papo_inputs(masked)
        loss, _ = PAPO(beta=0.0, entropy_weight_masked=0.1, recompute_with_grad=recompute)(inputs)
        loss.backward()
        assert logprobs.grad.abs().sum() > 0
        assert (masked.grad is not None and masked.grad.abs().sum() > 0) == recompute


def test_papo_view_rows_in_any_order():
    # The module may hand rows in any order; row 1's values must land on row 1.
    logprobs = t([[-1.0], [-2.0]])
    response = torch.ones(2, 1, dtype=torch.bool)
    ordered = ViewOutputs(torch.tensor([0, 1]), t([[-1.5], [-1.5]]))
    shuffled = ViewOutputs(torch.tensor([1, 0]), t([[-1.5], [-1.5]]).flip(0))
    losses = [
        PAPO(beta=0.0)(ObjectiveInputs(logprobs, response, t([0.0, 0.0]), views={"masked": v}))[0]
        for v in (ordered, shuffled)
    ]
    assert torch.equal(losses[0], losses[1])
    row_0_only = {"masked": ViewOutputs(torch.tensor([0]), t([[-1.5]]))}
    with pytest.raises(ValueError, match=r"views\['masked'\] lacks rows \[1\]"):
        PAPO(beta=0.0)(ObjectiveInputs(logprobs, response, t([0.0, 0.0]), views=row_0_only))


# ---------------------------------------------------------------------------------------------
# Construction, registry, configuration, documentation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (GRPO, {"beta": -0.1}, "beta must be >= 0"),
        (GRPO, {"eps_low": 1.0}, "eps_low"),
        (GRPO, {"dual_clip": 1.0}, "dual_clip must be > 1"),
        (GRPO, {"aggregation": "sum"}, "unknown aggregation 'sum'"),
        (GRPO, {"advantage_scale": "rank"}, "unknown advantage_scale 'rank'"),
        (CPPO, {"tau": -1.0}, "tau must be positive"),
        (CPPO, {"tau": 0.0}, "tau must be positive"),
        (CPPO, {"top_ratio": 0.0}, r"top_ratio must be in \(0, 1\]"),
        (CPPO, {"top_ratio": 1.5}, r"top_ratio must be in \(0, 1\]"),
        (CPPO, {"divergence": "js"}, "unknown divergence 'js'"),
        (CPPO, {"cpl_weight": -1.0}, "cpl_weight"),
        (PAPO, {"perception_weight": -0.02}, "perception_weight"),
        (PAPO, {"entropy_weight_masked": -1.0}, "entropy_weight_masked"),
    ],
)
def test_constructor_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_release_defaults():
    cppo = CPPO()
    assert (cppo.beta, cppo.eps_low, cppo.eps_high, cppo.dual_clip) == (0.01, 0.2, 0.2, 3.0)
    assert (cppo.cpl_weight, cppo.tau, cppo.top_ratio, cppo.aggregation) == (0.01, 0.1, 0.5, "token-mean")
    assert cppo.perception_mask and cppo.advantage_gating and cppo.divergence == "k3"
    papo = PAPO()
    assert papo.perception_weight == 0.02
    assert papo.entropy_weight_original == papo.entropy_weight_masked == 0.0
    assert not papo.recompute_with_grad


def test_registry():
    assert OBJECTIVES == {"grpo": GRPO, "cppo": CPPO, "papo": PAPO}
    objective = build_objective("CPPO", tau=0.2)
    assert isinstance(objective, CPPO) and objective.tau == 0.2
    assert repr(build_objective("grpo", beta=0.0)).startswith("GRPO(beta=0.0, eps_low=0.2")
    with pytest.raises(ValueError, match="unknown objective 'ppo'; expected one of grpo, cppo, papo"):
        build_objective("ppo")


def test_objectives_load_from_class_path_config():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--objective", type=Objective)
    class_path = "cppo_lightning.objectives.CPPO"
    init_args = {"tau": 0.2, "advantage_gating": False}
    config = parser.parse_object({"objective": {"class_path": class_path, "init_args": init_args}})
    objective = parser.instantiate(config).objective
    assert isinstance(objective, CPPO)
    assert (objective.tau, objective.advantage_gating, objective.cpl_weight) == (0.2, False, 0.01)
    with pytest.raises(Exception):
        parser.parse_object({"objective": {"class_path": class_path, "init_args": {"tua": 0.2}}})


@pytest.mark.parametrize("cls", [GRPO, CPPO, PAPO])
def test_every_returned_metric_is_documented(cls):
    case = _random_cppo_case(11, 4, 5, advantages=t([1.0, -1.0, 0.5, 0.0]))
    every = torch.arange(4)
    views = {
        "preserving": ViewOutputs(every, case["plus"]),
        "removing": ViewOutputs(every, case["minus"], entropy=case["entropy_removed"]),
        "masked": ViewOutputs(every, case["minus"]),
    }
    kwargs = {"entropy_weight_original": 0.1} if cls is PAPO else {}
    inputs = ObjectiveInputs(
        case["logprobs"], case["response"], case["advantages"], ref_logprobs=case["ref_logprobs"],
        entropy=case["entropy"], views=views,
    )  # fmt: skip
    _, metrics = cls(**kwargs)(inputs)
    docstring = cls.__doc__.split("Logged metrics:")[1].split("Args:")[0] + (Objective.__doc__ or "")
    documented = set(re.findall(r"``(\w+)``", docstring))
    assert set(metrics) <= documented & DOCUMENTED_METRICS
    assert all(m.dim() == 0 and not m.requires_grad and math.isfinite(m.item()) for m in metrics.values())


def test_config_round_trip_rebuilds_the_same_objective():
    from cppo_lightning.objectives import CPPO, PAPO, Objective

    for objective in (
        CPPO(beta=0.0, tau=0.2, top_ratio=0.3, advantage_gating=False),
        PAPO(perception_weight=0.05),
    ):
        config = objective.config()
        assert config["class_path"] == f"cppo_lightning.objectives.objectives.{type(objective).__name__}"
        rebuilt = Objective.from_config(config)
        assert type(rebuilt) is type(objective) and rebuilt.config() == config
    with pytest.raises(ValueError, match="not an Objective"):
        Objective.from_config({"class_path": "torch.nn.Linear", "init_args": {}})

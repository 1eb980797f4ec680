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
    PAPO,
    BatchCounts,
    Objective,
    ObjectiveInputs,
    ViewRequest,
    ViewScores,
)

DOCUMENTED_METRICS = {
    "loss", "policy_loss", "kl", "clip_fraction", "dual_clip_fraction", "ratio_mean", "entropy", "cpl",
    "divergence_preserving", "divergence_removing", "cpl_direction", "perception_fraction", "gated_fraction",
    "entropy_shift", "implicit_perception_loss", "double_entropy",
}  # fmt: skip


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


def all_rows(tensor, **kwargs):
    return ViewScores(tensor, torch.ones(tensor.shape[0], dtype=torch.bool), **kwargs)


def dense_view(original, rows, values, entropy=None, entropy_removed=None):
    """A view computed for ``rows`` only, written into the original's values as the scorer does."""
    index = torch.as_tensor(rows, dtype=torch.long)
    has = torch.zeros(original.shape[0], dtype=torch.bool)
    has[index] = True
    logprobs = torch.index_put(original.detach(), (index,), values)
    h = None if entropy_removed is None else torch.index_put(entropy, (index,), entropy_removed)
    return ViewScores(logprobs, has, entropy=h)


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
    output = GRPO(beta=0.5)(inputs)
    loss, metrics = output.loss, output.metrics
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
    output = objective(inputs)
    loss, metrics = output.loss, output.metrics
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
    with pytest.raises(ValueError, match=r"views\['masked'\].logprobs has shape \(2, 2\)"):
        objective(ObjectiveInputs(**good, views={"masked": all_rows(torch.zeros(2, 2))}))
    with pytest.raises(ValueError, match=r"views\['masked'\].rows must be a bool"):
        objective(
            ObjectiveInputs(**good, views={"masked": ViewScores(torch.zeros(2, 3), torch.tensor([0, 1]))})
        )


def test_a_non_finite_input_gives_a_non_finite_loss_not_a_sync():
    # Finiteness is checked once per optimizer step by the module (the loss and the gradient norm);
    # a NaN reference log-prob must reach the loss, not vanish.
    ref = torch.zeros(2, 3)
    ref[0, 0] = float("nan")
    inputs = ObjectiveInputs(
        torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), torch.zeros(2), ref_logprobs=ref
    )
    assert torch.isnan(GRPO()(inputs).loss)


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
    entropy = torch.ones(2, 3)
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=torch.ones(2, 3, dtype=torch.bool),
        advantages=advantages,
        entropy=entropy,
        views={
            "preserving": dense_view(logprobs, [0], plus),
            "removing": dense_view(logprobs, [0], minus, entropy, t([[1.5, 3.0, 1.0]])),
        },
    )
    output = objective(inputs)
    loss, metrics = output.loss, output.metrics
    assert output.diagnostics["perception_mask"].tolist() == [[False, True, False], [False, False, False]]
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


def test_cppo_asks_for_the_views_and_rows_its_loss_reads():
    # Gating: only A > 0 rows can hold perception tokens, so only they need I+ / I-.
    assert CPPO().view_rows(t([1.0, 0.0, -1.0])).tolist() == [True, False, False]
    assert CPPO(advantage_gating=False).view_rows(t([1.0, 0.0, -1.0])).tolist() == [True, True, True]
    # The mask needs H^I and H^{I-}; the full-KL ablation needs exact divergences and no entropy.
    requests = {r.name: r for r in CPPO().view_requests()}
    assert CPPO().needs_entropy and requests["removing"].entropy and not requests["preserving"].entropy
    assert all(r.with_grad and not r.divergence for r in requests.values())
    ablation = CPPO(perception_mask=False, divergence="full_kl")
    assert not ablation.needs_entropy
    assert all(r.divergence and not r.entropy for r in ablation.view_requests())
    # Without the perception mask the CPL covers every response token of the A > 0 rows.
    case = _random_cppo_case(2, 4, 5, advantages=t([1.0, -1.0, 0.5, 0.0]))
    inputs = ObjectiveInputs(case["logprobs"], case["response"], case["advantages"])
    mask = CPPO(perception_mask=False).select_tokens(inputs).masks["perception"]
    assert torch.equal(mask, case["response"] & t([1, 0, 1, 0]).bool().unsqueeze(-1))


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
    entropy = case["entropy"]
    inputs = ObjectiveInputs(
        logprobs=logprobs,
        response_mask=case["response"],
        advantages=case["advantages"],
        old_logprobs=case["old_logprobs"],
        ref_logprobs=case["ref_logprobs"],
        entropy=entropy,
        views={
            "preserving": dense_view(logprobs, view_rows, plus),
            "removing": dense_view(logprobs, view_rows, minus, entropy, case["entropy_removed"][view_rows]),
        },
    )
    output = objective(inputs)
    output.loss.backward()
    return output.loss, output.metrics, logprobs.grad, plus.grad, minus.grad


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
        if name != "entropy_shift":  # a mean over the view rows' tokens, which differ by design
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
    output = CPPO(beta=0.0, cpl_weight=1.0)(inputs)
    loss, metrics = output.loss, output.metrics
    # Isolate the CPL's own gradient on lp: subtract the policy-gradient part.
    loss.backward()
    assert plus.grad.abs().sum() > 0 and minus.grad.abs().sum() > 0
    assert entropy.grad is None and entropy_removed.grad is None
    pg_only = logprobs.detach().clone().requires_grad_()
    GRPO(beta=0.0)(ObjectiveInputs(pg_only, case["response"], case["advantages"])).loss.backward()
    assert not torch.equal(logprobs.grad, pg_only.grad)  # the CPL moves lp^I too
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())


def test_cppo_full_kl_uses_the_exact_divergences():
    # D+ = 0.1, D- = 0.3 on every token of the A > 0 row 0 (perception mask off):
    # cpl = softplus((0.1 - 0.3) / 0.1) = softplus(-2) = 0.126928 on each of its 2 tokens.
    response = torch.ones(2, 2, dtype=torch.bool)
    logprobs = torch.full((2, 2), -1.0)
    has = torch.tensor([True, False])
    d_plus = t([[0.1, 0.1], [0.0, 0.0]], requires_grad=True)
    d_minus = t([[0.3, 0.3], [0.0, 0.0]], requires_grad=True)
    views = {
        "preserving": ViewScores(logprobs, has, divergence=d_plus),
        "removing": ViewScores(logprobs, has, divergence=d_minus),
    }
    objective = CPPO(beta=0.0, cpl_weight=1.0, divergence="full_kl", perception_mask=False)
    output = objective(ObjectiveInputs(logprobs, response, t([1.0, -1.0]), views=views))
    torch.testing.assert_close(output.metrics["cpl"], t(0.126928))
    torch.testing.assert_close(output.metrics["divergence_removing"], t(0.3))
    output.loss.backward()
    # d cpl / d D+ = sigmoid(-2) / tau = 1.192029 per token, / 2 tokens of the mean.
    torch.testing.assert_close(d_plus.grad, t([[0.596014, 0.596014], [0.0, 0.0]]))


def test_cppo_view_errors():
    case = _random_cppo_case(0, 3, 4, advantages=t([1.0, 1.0, -1.0]))
    base = dict(
        logprobs=case["logprobs"],
        response_mask=case["response"],
        advantages=case["advantages"],
        ref_logprobs=case["ref_logprobs"],
        entropy=case["entropy"],
    )
    removing = dense_view(
        case["logprobs"], [0, 1], case["minus"][:2], case["entropy"], case["entropy_removed"][:2]
    )
    preserving = dense_view(case["logprobs"], [0, 1], case["plus"][:2])
    with pytest.raises(ValueError, match="needs the 'preserving' view"):
        CPPO()(ObjectiveInputs(**base, views={"removing": removing}))
    no_entropy = dense_view(case["logprobs"], [0, 1], case["minus"][:2])
    with pytest.raises(ValueError, match=r"needs views\['removing'\].entropy"):
        CPPO()(ObjectiveInputs(**base, views={"preserving": preserving, "removing": no_entropy}))
    with pytest.raises(ValueError, match="needs ObjectiveInputs.entropy"):
        CPPO()(
            ObjectiveInputs(
                **{**base, "entropy": None}, views={"preserving": preserving, "removing": removing}
            )
        )
    with pytest.raises(ValueError, match=r"needs views\['preserving'\].divergence"):
        CPPO(divergence="full_kl")(
            ObjectiveInputs(**base, views={"preserving": preserving, "removing": removing})
        )


# ---------------------------------------------------------------------------------------------
# PAPO
# ---------------------------------------------------------------------------------------------


def _papo_inputs(masked):
    logprobs = t([[-1.0, -2.0]], requires_grad=True)
    return logprobs, ObjectiveInputs(
        logprobs=logprobs,
        response_mask=torch.ones(1, 2, dtype=torch.bool),
        advantages=t([0.0]),  # PG term is exactly 0
        views={"masked": all_rows(masked)},
    )


def test_papo_hand_computed():
    # k3 at d = -1.5 - -1 = -0.5: 0.106531; at d = -1.5 - -2 = 0.5: 0.148721; token mean 0.127626.
    # Loss = -0.02 * 0.127626 = -0.00255252.
    masked = t([[-1.5, -1.5]], requires_grad=True)
    _, inputs = _papo_inputs(masked)
    output = PAPO(beta=0.0)(inputs)
    loss, metrics = output.loss, output.metrics
    torch.testing.assert_close(loss, t(-0.00255252))
    torch.testing.assert_close(metrics["implicit_perception_loss"], t(-0.127626))
    assert "double_entropy" not in metrics
    # Double entropy: 0.5 * mean(1, 2) + 0.1 * mean(1.5, 1.5) = 0.75 + 0.15 = 0.9 -> 0.897447.
    output = PAPO(beta=0.0, entropy_weight_original=0.5, entropy_weight_masked=0.1)(inputs)
    loss, metrics = output.loss, output.metrics
    torch.testing.assert_close(loss, t(0.897447))
    torch.testing.assert_close(metrics["double_entropy"], t(0.9))


def test_papo_masked_view_gradient_only_when_recomputed():
    assert PAPO().view_requests() == [ViewRequest("masked", with_grad=False)]
    assert PAPO(recompute_with_grad=True).view_requests() == [ViewRequest("masked", with_grad=True)]
    for recompute in (False, True):
        masked = t([[-1.5, -1.5]], requires_grad=True)
        logprobs, inputs = _papo_inputs(masked)
        PAPO(beta=0.0, entropy_weight_masked=0.1, recompute_with_grad=recompute)(inputs).loss.backward()
        assert logprobs.grad.abs().sum() > 0
        assert (masked.grad is not None and masked.grad.abs().sum() > 0) == recompute


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


def test_the_removed_registry_still_works_for_one_version_with_a_warning():
    import cppo_lightning.objectives as objectives

    with pytest.warns(DeprecationWarning, match="Objective.from_config"):
        OBJECTIVES = objectives.OBJECTIVES
    with pytest.warns(DeprecationWarning, match="name the class"):
        build_objective = objectives.build_objective
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
    views = {
        "preserving": all_rows(case["plus"]),
        "removing": all_rows(case["minus"], entropy=case["entropy_removed"]),
        "masked": all_rows(case["minus"]),
    }
    kwargs = {"entropy_weight_original": 0.1} if cls is PAPO else {}
    inputs = ObjectiveInputs(
        case["logprobs"], case["response"], case["advantages"], ref_logprobs=case["ref_logprobs"],
        entropy=case["entropy"], views=views,
    )  # fmt: skip
    metrics = cls(**kwargs)(inputs).metrics
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


# ---------------------------------------------------------------------------------------------
# Mini-batch normalisation: the loss does not depend on how a mini-batch is cut
# ---------------------------------------------------------------------------------------------


def _inputs_for_rows(case, rows, counts=None, selected=None):
    """Dense inputs of ``rows`` of a CPPO case, every view computed (leaf tensors with gradient)."""
    rows = torch.as_tensor(rows)
    leaves = {name: case[name][rows].clone().requires_grad_() for name in ("logprobs", "plus", "minus")}
    inputs = ObjectiveInputs(
        logprobs=leaves["logprobs"],
        response_mask=case["response"][rows],
        advantages=case["advantages"][rows],
        ref_logprobs=case["ref_logprobs"][rows],
        entropy=case["entropy"][rows],
        views={
            "preserving": all_rows(leaves["plus"]),
            "removing": all_rows(leaves["minus"], entropy=case["entropy_removed"][rows]),
            "masked": all_rows(leaves["plus"]),
        },
        counts=counts,
        selected=None if selected is None else {"perception": selected[rows]},
    )
    return inputs, leaves


def _totals(case, selected):
    response = case["response"]
    return {
        "tokens": float(response.sum()),
        "sequences": float((response.sum(1) > 0).sum()),
        "rows": float(response.shape[0]),
        "perception": float(selected.sum()),
        "view:removing": float((response & (case["advantages"] > 0).unsqueeze(-1)).sum()),
    }


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    rows=st.integers(2, 9),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=4),
    objective=st.sampled_from(
        [
            CPPO(cpl_weight=1.0),
            CPPO(cpl_weight=1.0, aggregation="seq-mean-token-mean"),
            GRPO(aggregation="seq-mean-token-sum"),
            PAPO(perception_weight=0.5, entropy_weight_original=0.1),
        ]
    ),
)
def test_micro_batch_shares_add_up_to_the_mini_batch_loss_and_gradient(seed, rows, cuts, objective):
    case = _random_cppo_case(seed, rows, 6)
    whole, whole_leaves = _inputs_for_rows(case, range(rows))
    selection = objective.select_tokens(whole)
    selected = None if selection is None else selection.masks["perception"]
    reference = objective(whole)
    reference.loss.backward()
    # Cut the rows into micro-batches at arbitrary points; each gets the mini-batch's totals.
    bounds = sorted({min(c, rows - 1) for c in cuts} | {0, rows})
    counts = BatchCounts(_totals(case, selected if selected is not None else case["response"]))
    loss, grads = (
        torch.zeros(()),
        {name: torch.zeros_like(case[name]) for name in ("logprobs", "plus", "minus")},
    )
    metrics = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        inputs, leaves = _inputs_for_rows(case, range(start, end), counts, selected)
        output = objective(inputs)
        output.loss.backward()
        loss = loss + output.loss.detach()
        for name, leaf in leaves.items():
            grads[name][start:end] = leaf.grad if leaf.grad is not None else 0.0
        for key, value in output.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    torch.testing.assert_close(loss, reference.loss.detach(), rtol=1e-5, atol=1e-7)
    for name, leaf in whole_leaves.items():
        expected = leaf.grad if leaf.grad is not None else torch.zeros_like(grads[name])
        torch.testing.assert_close(grads[name], expected, rtol=1e-5, atol=1e-7)
    for key, value in reference.metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_the_release_aggregation_averages_micro_batch_means():
    # Micro-batch A: one row, 2 tokens with pg 1 each (A = -1, ratio 1); micro-batch B: one row,
    # 1 token with pg -1 (A = 1). Release: (mean_A + mean_B) / 2 = (1 + -1) / 2 = 0.
    # Mini-batch token-mean: (1 + 1 - 1) / 3 = 1/3, whatever the cut.
    logprobs = torch.full((2, 2), -1.0)
    response = torch.tensor([[True, True], [True, False]])
    advantages = t([-1.0, 1.0])
    totals = BatchCounts({"tokens": 3.0, "sequences": 2.0, "rows": 2.0}, micro_batches=2)
    release, invariant = GRPO(beta=0.0, aggregation="micro-batch-token-mean"), GRPO(beta=0.0)
    shares = {"release": 0.0, "invariant": 0.0}
    for row in (0, 1):
        inputs = ObjectiveInputs(logprobs[row : row + 1], response[row : row + 1], advantages[row : row + 1])
        inputs.counts = totals
        shares["release"] += float(release(inputs).loss)
        shares["invariant"] += float(invariant(inputs).loss)
    assert shares["release"] == pytest.approx(0.0)
    assert shares["invariant"] == pytest.approx(1 / 3)
    assert not release.normalises_over_mini_batch and invariant.normalises_over_mini_batch


def test_world_size_scales_each_ranks_share_so_that_ddp_averaging_gives_the_global_mean():
    # Rank 0 holds tokens worth 1 + 2, rank 1 holds 6; the global token-mean is 9 / 3 = 3.
    # DDP averages the ranks' gradients (and Lightning their logged values): (s0 + s1) / 2 = 3.
    counts = BatchCounts({"tokens": 3.0}, world_size=2)
    from cppo_lightning.objectives import masked_aggregate

    s0 = masked_aggregate(t([[1.0, 2.0]]), torch.ones(1, 2, dtype=torch.bool), counts=counts)
    s1 = masked_aggregate(t([[6.0, 0.0]]), torch.tensor([[True, False]]), counts=counts)
    assert float(s0) == pytest.approx(2.0) and float(s1) == pytest.approx(4.0)
    assert (float(s0) + float(s1)) / 2 == pytest.approx(3.0)

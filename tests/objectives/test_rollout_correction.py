"""The sampler/learner mismatch correction: hand-computed weights in every mode, the corrected loss's
gradient against the hand-written formula, properties, and errors on bad settings."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_lightning.engines import sampler_kl
from cppo_lightning.objectives import (
    CPPO,
    GRPO,
    PRESERVING,
    REMOVING,
    ROLLOUT_CORRECTIONS,
    ObjectiveInputs,
    ViewScores,
    clipped_policy_loss,
    k3_kl,
    rollout_correction_weights,
)

FAST = settings(max_examples=60, deadline=None)
NAN = float("nan")


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


def log(values):
    return [math.log(value) for value in values]


# Four rows of up to 3 tokens; the sampler's log-probs are 0, so the weight is exp(lp_old) = ratio.
# Row 0: token ratios 4, 1, 0.6        (geometric mean (2.4) ** (1/3) = 1.3389)
# Row 1: token ratios 8, 8, 1          (geometric mean 4)
# Row 2: one token, ratio 0.25; its padding holds NaN in the sampler (never read)
# Row 3: empty completion
RATIOS = [[4.0, 1.0, 0.6], [8.0, 8.0, 1.0], [0.25, 1.0, 1.0], [1.0, 1.0, 1.0]]
MASK = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
OLD = t([log(row) for row in RATIOS])
SAMPLER = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, NAN, NAN], [NAN, NAN, NAN]])
GEOMETRIC = [2.4 ** (1 / 3), 4.0, 0.25]


def weights_of(mode, **kwargs):
    return rollout_correction_weights(OLD, SAMPLER, MASK, mode, **kwargs)


def test_token_truncation_caps_each_token_at_two():
    weights, changed = weights_of("token_truncate")
    expected = t([[2.0, 1.0, 0.6], [2.0, 2.0, 1.0], [0.25, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(weights, expected)
    assert changed.tolist() == [[True, False, False], [True, True, False], [False] * 3, [False] * 3]


def test_token_masking_drops_the_tokens_outside_the_band():
    weights, changed = weights_of("token_mask")  # band [0.5, 2]
    expected = t([[0.0, 1.0, 0.6], [0.0, 0.0, 1.0], [0.0, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(weights, expected)
    assert changed.tolist() == [[True, False, False], [True, True, False], [True, False, False], [False] * 3]
    weights, changed = weights_of("token_mask", band=(0.2, 5.0))
    torch.testing.assert_close(weights, t([[4.0, 1.0, 0.6], [0.0, 0.0, 1.0], [0.25, 0, 0], [0, 0, 0]]))


def test_sequence_truncation_uses_the_geometric_mean_of_each_response():
    weights, changed = weights_of("sequence_truncate")
    g0, _, g2 = GEOMETRIC
    expected = t([[g0] * 3, [2.0] * 3, [g2, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(weights, expected)
    assert changed.tolist() == [[False] * 3, [True] * 3, [False] * 3, [False] * 3]


def test_sequence_masking_drops_whole_responses_outside_the_band():
    weights, changed = weights_of("sequence_mask")
    g0 = GEOMETRIC[0]
    torch.testing.assert_close(weights, t([[g0] * 3, [0.0] * 3, [0.0, 0, 0], [0, 0, 0]]))
    assert changed.tolist() == [[False] * 3, [True] * 3, [True, False, False], [False] * 3]


def test_none_is_weight_one_on_response_tokens():
    weights, changed = weights_of("none")
    torch.testing.assert_close(weights, MASK.float())
    assert not changed.any()


def test_the_corrected_gradient_is_the_hand_written_formula():
    # lp = lp_old on tokens 0-1 (rho = 1, inside the clip range); on token 2 of row 0, rho = 1.5 > 1.2
    # with A > 0: the clipped branch is constant there, so its gradient is 0.
    # Token-mean over N = 6 response tokens: d/d lp_t of w_t * (-A rho_t) / N = -A w_t rho_t / N.
    old = t([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    sampler = t([log([0.25, 1.0, 1.0]), log([1 / 3, 1.0, 0.5])])  # token weights 4, 1, 1 | 3, 1, 2
    lp = t([[0.0, 0.0, math.log(1.5)], [0.0, 0.0, 0.0]]).requires_grad_()
    advantages = t([1.0, -2.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    weights, _ = rollout_correction_weights(old, sampler, mask, "token_truncate", cap=2.0)
    loss, _ = clipped_policy_loss(lp, old, advantages, mask, weights=weights, dual_clip=None)
    loss.backward()
    expected = t([[-1 * 2 / 6, -1 * 1 / 6, 0.0], [2 * 2 / 6, 2 * 1 / 6, 2 * 2 / 6]])
    torch.testing.assert_close(lp.grad, expected)
    # The loss itself: row 0 = -(2 + 1 + 1.2), row 1 = 2 * (2 + 1 + 2); token mean over 6.
    assert loss.item() == pytest.approx((-(2 + 1 + 1.2) + 2 * (2 + 1 + 2)) / 6)


def test_the_weight_multiplies_the_policy_gradient_only_not_the_kl():
    # GRPO with beta: L = mean(w * pg) + beta * mean(k3). At lp = lp_old, d pg / d lp = -A, and
    # d k3(lp, ref) / d lp = 1 - exp(ref - lp). N = 3 tokens, one row.
    lp = t([[0.0, -1.0, -0.5]]).requires_grad_()
    ref = t([[0.0, -0.5, -1.0]])
    sampler = t([[-math.log(4.0), -1.0, -0.5 + math.log(2.0)]])  # weights 4 -> 2 (cap), 1, 0.5
    inputs = ObjectiveInputs(
        logprobs=lp,
        response_mask=torch.ones(1, 3, dtype=torch.bool),
        advantages=t([1.5]),
        ref_logprobs=ref,
        sampler_logprobs=sampler,
    )
    objective = GRPO(beta=0.1, rollout_correction="token_truncate")
    output = objective(inputs)
    output.loss.backward()
    weights = t([[2.0, 1.0, 0.5]])
    expected = (-1.5 * weights + 0.1 * (1 - torch.exp(ref - lp.detach()))) / 3
    torch.testing.assert_close(lp.grad, expected)
    assert output.metrics["is_weight_mean"].item() == pytest.approx(3.5 / 3)
    assert output.metrics["is_truncated_fraction"].item() == pytest.approx(1 / 3)
    assert output.metrics["kl"].item() == pytest.approx(k3_kl(lp.detach(), ref).mean().item())


def cppo_inputs(sampler):
    torch.manual_seed(0)
    lp = (-torch.rand(2, 4)).requires_grad_()
    views = {
        name: ViewScores(
            (lp.detach() - 0.3 * torch.rand(2, 4)).requires_grad_(),
            torch.tensor([True, False]),
            entropy=torch.rand(2, 4) if name == REMOVING else None,
        )
        for name in (PRESERVING, REMOVING)
    }
    return ObjectiveInputs(
        logprobs=lp,
        response_mask=torch.ones(2, 4, dtype=torch.bool),
        advantages=t([1.0, -1.0]),
        entropy=torch.rand(2, 4),
        views=views,
        sampler_logprobs=sampler,
    )


def test_the_contrastive_perception_loss_is_not_weighted():
    sampler = t([[-1.0] * 4, [0.5] * 4])
    plain = CPPO(beta=0.0)(cppo_inputs(sampler))
    corrected = CPPO(beta=0.0, rollout_correction="sequence_truncate")(cppo_inputs(sampler))
    assert corrected.metrics["cpl"].item() == pytest.approx(plain.metrics["cpl"].item())
    assert corrected.metrics["policy_loss"].item() != pytest.approx(plain.metrics["policy_loss"].item())
    # Everything beyond the policy gradient is the same in both losses.
    plain_rest = plain.loss.item() - plain.metrics["policy_loss"].item()
    corrected_rest = corrected.loss.item() - corrected.metrics["policy_loss"].item()
    assert corrected_rest == pytest.approx(plain_rest, abs=1e-6)  # float32 sums of different terms


def test_sequence_metrics_count_responses_not_tokens():
    # Row 0: 3 tokens of ratio 8 (masked); row 1: 1 token, ratio 1; row 2: empty.
    lp = torch.zeros(3, 3)
    sampler = t([[-math.log(8.0)] * 3, [0.0] * 3, [0.0] * 3])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    inputs = ObjectiveInputs(
        logprobs=lp, response_mask=mask, advantages=t([1.0, 1.0, 0.0]), sampler_logprobs=sampler
    )
    metrics = GRPO(beta=0.0, rollout_correction="sequence_mask")(inputs).metrics
    assert metrics["is_masked_fraction"].item() == pytest.approx(1 / 2)  # of the 2 responses with tokens
    assert metrics["is_weight_mean"].item() == pytest.approx((0.0 + 1.0) / 2)


@st.composite
def _mismatch(draw):
    rows, tokens = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    logs = st.floats(-4.0, 4.0, allow_nan=False)
    old = t(draw(st.lists(st.lists(logs, min_size=tokens, max_size=tokens), min_size=rows, max_size=rows)))
    sampler = t(
        draw(st.lists(st.lists(logs, min_size=tokens, max_size=tokens), min_size=rows, max_size=rows))
    )
    lengths = draw(st.lists(st.integers(0, tokens), min_size=rows, max_size=rows))
    mask = torch.arange(tokens) < torch.tensor(lengths).unsqueeze(1)
    return old, sampler, mask


@FAST
@given(case=_mismatch(), mode=st.sampled_from(ROLLOUT_CORRECTIONS[1:]), cap=st.floats(1.0, 5.0))
def test_weights_are_bounded_detached_and_zero_on_padding(case, mode, cap):
    old, sampler, mask = case
    band = (1 / cap, cap)
    weights, changed = rollout_correction_weights(
        old.requires_grad_(), sampler, mask, mode, cap=cap, band=band
    )
    assert not weights.requires_grad
    assert (weights[~mask] == 0).all() and not changed[~mask].any()
    kept = weights[mask & ~changed]
    if mode.endswith("truncate"):
        assert (weights <= cap * (1 + 1e-6)).all()
        assert torch.allclose(weights[mask & changed], torch.tensor(cap))
    else:
        assert (weights[changed] == 0).all()
        assert ((kept >= band[0] * (1 - 1e-6)) & (kept <= band[1] * (1 + 1e-6))).all()
    if mode.startswith("sequence"):  # one weight per response
        for row in range(len(weights)):
            values = weights[row][mask[row]]
            assert torch.allclose(values, values[:1].expand_as(values)) if len(values) else True
    # Where the sampler and the policy agree, every weight is 1 and nothing is changed.
    same, same_changed = rollout_correction_weights(old, old, mask, mode, cap=cap, band=band)
    torch.testing.assert_close(same, mask.float())
    assert not same_changed.any()


def test_sampler_kl_hand_computed():
    # Row 0: d = lp_policy - lp_sampler = [0, 1] -> k3 = [0, e - 2]; row 1: d = -0.5 -> e^-0.5 - 0.5;
    # row 2: no response tokens (left out of the mean).
    sampler = t([[-1.0, -2.0], [-0.5, 0.0], [0.0, 0.0]])
    policy = t([[-1.0, -1.0], [-1.0, 5.0], [3.0, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0], [0, 0]], dtype=torch.bool)
    expected = ((math.e - 2) + (math.exp(-0.5) + 0.5 - 1)) / 2
    assert sampler_kl(sampler, policy, mask).item() == pytest.approx(expected, rel=1e-6)
    assert sampler_kl(sampler, policy, torch.zeros_like(mask)).item() == 0.0


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(rollout_correction="tis"), "unknown rollout_correction 'tis'"),
        (dict(rollout_correction="token_truncate", correction_cap=0.5), "correction_cap must be >= 1"),
        (
            dict(rollout_correction="token_mask", correction_band=[1.5, 2.0]),
            r"correction_band must be \[low, high\]",
        ),
        (
            dict(rollout_correction="token_mask", correction_band=[0.5]),
            r"correction_band must be \[low, high\]",
        ),
    ],
)
def test_bad_correction_settings_are_refused_with_their_names(settings, message):
    with pytest.raises(ValueError, match=message):
        GRPO(**settings)


def test_a_correction_without_the_sampler_logprobs_names_the_missing_field():
    inputs = ObjectiveInputs(
        logprobs=torch.zeros(1, 2), response_mask=torch.ones(1, 2, dtype=torch.bool), advantages=t([1.0])
    )
    with pytest.raises(ValueError, match="sampler_logprobs"):
        GRPO(beta=0.0, rollout_correction="token_mask")(inputs)

"""Pure loss functions: hand-computed values, properties, and errors on bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_lightning.objectives import (
    NonFiniteError,
    check_finite,
    clipped_policy_loss,
    contrastive_perception_loss,
    contrastive_perception_loss_from_divergences,
    double_entropy_loss,
    full_kl,
    group_advantages,
    implicit_perception_loss,
    k3_kl,
    masked_aggregate,
    perception_token_mask,
    token_entropy,
    token_logprobs,
)

LOG2 = math.log(2.0)
FAST = settings(max_examples=60, deadline=None)


def t(values, **kwargs):
    return torch.tensor(values, dtype=torch.float32, **kwargs)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    # Group 1: [1, 0, 0, 1], mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735,
    # A = +-0.5 / (0.57735 + 1e-6) = +-0.866024. Group 2: [3, 1], mean 2, std = sqrt(2) -> +-0.707106.
    rewards = t([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    with pytest.raises(ValueError, match="group_size 4 does not divide the number of rewards 6"):
        group_advantages(rewards, 4)
    adv = group_advantages(t([1.0, 0.0, 0.0, 1.0]), 4)
    torch.testing.assert_close(adv, t([0.866024, -0.866024, -0.866024, 0.866024]))
    adv = group_advantages(t([3.0, 1.0, 1.0, 0.0]), 2)
    # Second group [1, 0]: mean 0.5, std sqrt(0.5) = 0.707107 -> +-0.5 / 0.707108 = +-0.707106.
    torch.testing.assert_close(adv, t([0.707106, -0.707106, 0.707106, -0.707106]))


def test_group_advantages_dr_grpo_only_centres():
    # scale="none": r - mean. [1, 0, 0, 1] -> [0.5, -0.5, -0.5, 0.5]; [0.9, 0.1] -> [0.4, -0.4].
    adv = group_advantages(t([1.0, 0.0, 0.0, 1.0]), 4, scale="none")
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5]))
    torch.testing.assert_close(group_advantages(t([0.9, 0.1]), 2, scale="none"), t([0.4, -0.4]))


def test_group_advantages_constant_group_is_exactly_zero_and_group_size_one_is_zero():
    # 0.1 * 3 / 3 need not round back to 0.1; the constant group must still give exactly 0.
    adv = group_advantages(t([0.1, 0.1, 0.1, 1.0, 0.0, 0.5]), 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert torch.equal(group_advantages(t([0.3, 1.0, -2.0]), 1), torch.zeros(3))


@FAST
@given(
    reward=st.floats(-1e3, 1e3, allow_nan=False, width=32),
    group_size=st.integers(1, 8),
    others=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=8, max_size=8),
    scale=st.sampled_from(["std", "none"]),
)
def test_constant_reward_group_has_zero_advantage(reward, group_size, others, scale):
    rewards = t([reward] * group_size + others[:group_size])
    adv = group_advantages(rewards, group_size, scale=scale)
    assert torch.equal(adv[:group_size], torch.zeros(group_size))
    # Advantages of every group sum to ~0 (centred).
    assert adv.view(-1, group_size).sum(dim=1).abs().max() <= 1e-3 * max(1.0, group_size)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError, match="positive integer"):
        group_advantages(t([1.0, 2.0]), 0)
    with pytest.raises(ValueError, match="advantage scale"):
        group_advantages(t([1.0, 2.0]), 2, scale="mad")
    with pytest.raises(NonFiniteError, match="rewards has 1 non-finite value"):
        group_advantages(t([1.0, float("nan")]), 2)


# ---------------------------------------------------------------------------------------------
# token_logprobs / token_entropy
# ---------------------------------------------------------------------------------------------


def test_token_logprobs_hand_computed():
    # logits [0, ln 3]: softmax [1/4, 3/4]; token 1 -> ln 0.75 = -0.287682.
    # Temperature 2: [0, ln 3 / 2] -> p1 = sqrt3 / (1 + sqrt3) = 0.633975 -> ln = -0.455746.
    logits = t([[[0.0, math.log(3.0)]]], requires_grad=True)
    tokens = torch.tensor([[1]])
    lp = token_logprobs(logits, tokens)
    torch.testing.assert_close(lp, t([[-0.287682]]))
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=2.0), t([[-0.455746]]))
    # d lp / d logits = onehot - softmax = [-0.25, 0.25].
    lp.sum().backward()
    torch.testing.assert_close(logits.grad, t([[[-0.25, 0.25]]]))


def _naive_logprobs(logits, tokens, temperature):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _naive_entropy(logits, temperature):
    logp = torch.log_softmax(logits / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 64])
def test_token_logprobs_and_entropy_match_naive(temperature, chunk_size):
    torch.manual_seed(0)
    logits = (3 * torch.randn(5, 7, 11)).requires_grad_()
    naive_logits = logits.detach().clone().requires_grad_()
    tokens = torch.randint(0, 11, (5, 7))
    weights = torch.randn(5, 7)

    lp = token_logprobs(logits, tokens, temperature, chunk_size)
    expected = _naive_logprobs(naive_logits, tokens, temperature)
    torch.testing.assert_close(lp, expected)
    (lp * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(logits.grad, naive_logits.grad)

    entropy = token_entropy(logits, temperature, chunk_size)
    assert not entropy.requires_grad
    # H = logsumexp(z) - sum p z (the release's formula, one block of temporaries) loses about
    # ulp(|z|) ~ 1e-6 * |z| per term in float32; |z| reaches 15 here, hence atol 5e-5. In
    # float64 it agrees with the log_softmax computation to rounding.
    torch.testing.assert_close(entropy, _naive_entropy(logits.detach(), temperature), atol=5e-5, rtol=1e-5)
    exact = token_entropy(logits.detach().double(), temperature, chunk_size)
    naive = _naive_entropy(logits.detach().double(), temperature)
    torch.testing.assert_close(exact, naive, atol=1e-12, rtol=1e-10)


def test_token_logprobs_gradcheck_float64_and_sliced_views():
    torch.manual_seed(1)
    full = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4))
    # A non-contiguous slice over positions, as when only completion positions are scored.
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x[:, 1:5], tokens, 0.8, 2), (full,))


def test_token_logprobs_bfloat16_logits():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 9).to(torch.bfloat16).requires_grad_()
    tokens = torch.randint(0, 9, (2, 3))
    lp = token_logprobs(logits, tokens)
    assert lp.dtype == torch.float32  # computed in float32
    torch.testing.assert_close(lp, _naive_logprobs(logits.detach(), tokens, 1.0))
    lp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


def test_token_logprobs_keeps_no_copy_of_the_logits_for_backward():
    # The naive log_softmax path saves a [R, T, V] log-softmax for backward (a second copy of
    # the logits). The chunked path must save nothing of that size except the logits themselves.
    logits = torch.randn(4, 8, 32, requires_grad=True)
    tokens = torch.randint(0, 32, (4, 8))
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logprobs(logits, tokens, temperature=0.7, chunk_size=1)
        big = [s for s in saved if s.numel() >= logits.numel() // 4]
        assert big and all(s.data_ptr() == logits.data_ptr() for s in big)
        saved.clear()
        _naive_logprobs(logits, tokens, 0.7)
        assert any(s.numel() == logits.numel() and s.data_ptr() != logits.data_ptr() for s in saved)


def test_token_entropy_hand_computed():
    # Uniform over 4 -> ln 4 = 1.386294. [0, ln 3] -> p = [1/4, 3/4],
    # H = 0.25 ln 4 + 0.75 ln(4/3) = 0.346574 + 0.215762 = 0.562335.
    # [0, 0, -inf]: the -inf entry has p = 0 and contributes 0 -> ln 2 = 0.693147.
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e9, -1e9], [0.0, 0.0, float("-inf"), -1e9]]])
    torch.testing.assert_close(token_entropy(logits), t([[1.386294, 0.562335, 0.693147]]))
    # Broken logits give NaN, not a plausible number.
    assert torch.isnan(token_entropy(t([[[0.0, float("nan")]]]))).all()


def test_token_logprobs_shape_errors():
    with pytest.raises(ValueError, match=r"tokens has shape \(2, 4\) but logits has shape \(2, 3, 5\)"):
        token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be positive"):
        token_entropy(torch.zeros(2, 3, 5), temperature=0.0)
    with pytest.raises(ValueError, match=r"tokens must be ids in \[0, 5\).*got values in \[-100, 4\]"):
        token_logprobs(torch.zeros(2, 3, 5), torch.tensor([[0, 4, -100], [1, 1, 1]]))


# ---------------------------------------------------------------------------------------------
# k3_kl, full_kl, masked_aggregate
# ---------------------------------------------------------------------------------------------


def test_k3_kl_hand_computed():
    # d = ref - lp. d = 0.5: e^0.5 - 0.5 - 1 = 0.148721. d = -0.5: e^-0.5 + 0.5 - 1 = 0.106531.
    # d = 0 -> 0. d = -30 clamps to -20: e^-20 + 20 - 1 = 19 -> clamped to 10.
    # d = 30 clamps to 20: e^20 - 21 = 4.85e8 -> clamped to 10.
    lp = t([[-1.0, -1.0, -2.0, 0.0, -30.0]])
    ref = t([[-0.5, -1.5, -2.0, -30.0, 0.0]])
    torch.testing.assert_close(k3_kl(lp, ref), t([[0.148721, 0.106531, 0.0, 10.0, 10.0]]))


def test_full_kl_hand_computed():
    # p = [0.5, 0.5], q = [0.25, 0.75]: 0.5 ln 2 + 0.5 ln(2/3) = 0.346574 - 0.202733 = 0.143841.
    p, q = t([[[0.5, 0.5]]]).log(), t([[[0.25, 0.75]]]).log()
    torch.testing.assert_close(full_kl(p, q), t([[0.143841]]))
    torch.testing.assert_close(full_kl(p, p), t([[0.0]]))


def test_masked_aggregate_modes_hand_computed():
    values = t([[1.0, 2.0, 3.0], [4.0, float("nan"), 0.0]])  # the NaN is padding
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    torch.testing.assert_close(masked_aggregate(values, mask), t(2.5))
    # seq-mean-token-mean: rows 6/3 = 2 and 4/1 = 4 -> 3
    torch.testing.assert_close(masked_aggregate(values, mask, "seq-mean-token-mean"), t(3.0))
    # seq-mean-token-sum: rows 6 and 4 -> 5; divided by max_length 4 -> 1.25
    torch.testing.assert_close(masked_aggregate(values, mask, "seq-mean-token-sum"), t(5.0))
    torch.testing.assert_close(masked_aggregate(values, mask, "seq-mean-token-sum", max_length=4), t(1.25))
    # A row without response tokens is left out of the seq-mean-token-mean row average.
    torch.testing.assert_close(
        masked_aggregate(values, torch.tensor([[True, True, False], [False] * 3]), "seq-mean-token-mean"),
        t(1.5),
    )
    with pytest.raises(ValueError, match="unknown aggregation 'mean'"):
        masked_aggregate(values, mask, "mean")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_masked_aggregate_empty_mask_is_zero_with_finite_gradient(mode):
    values = torch.randn(2, 3, requires_grad=True)
    result = masked_aggregate(values, torch.zeros(2, 3, dtype=torch.bool), mode)
    result.backward()
    assert result.item() == 0.0
    assert torch.equal(values.grad, torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# clipped_policy_loss
# ---------------------------------------------------------------------------------------------


def _policy_batch():
    # Row 0, A = 2, log-ratios [0.5, -0.5, 0.1] -> ratios [1.648721, 0.606531, 1.105171]:
    #   t0: -min(3.297443, 1.2 * 2 = 2.4) = -2.4                  (clipped)
    #   t1: -min(1.213061, 0.8 * 2 = 1.6) = -1.213061             (unclipped)
    #   t2: ratio inside [0.8, 1.2]: -2.210342
    # Row 1, A = -1, log-ratios [ln 5, ln 0.5, 0] -> ratios [5, 0.5, 1]:
    #   t0: -min(-5, -1.2) = 5, dual clip min(5, 3 * 1) = 3         (dual clipped)
    #   t1: -min(-0.5, -0.8) = 0.8                                (clipped)
    #   t2: padding
    old = torch.zeros(2, 3)
    logprobs = t([[0.5, -0.5, 0.1], [math.log(5.0), math.log(0.5), 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return logprobs, old, t([2.0, -1.0]), mask


def test_clipped_policy_loss_hand_computed():
    logprobs, old, adv, mask = _policy_batch()
    loss, metrics = clipped_policy_loss(logprobs, old, adv, mask)
    # (-2.4 - 1.213061 - 2.210342 + 3 + 0.8) / 5 = -2.023403 / 5 = -0.404681
    torch.testing.assert_close(loss, t(-0.404681))
    torch.testing.assert_close(metrics["clip_fraction"], t(0.4))  # t00 and t11
    torch.testing.assert_close(metrics["dual_clip_fraction"], t(0.2))  # t10
    # (1.648721 + 0.606531 + 1.105171 + 5 + 0.5) / 5 = 1.772085
    torch.testing.assert_close(metrics["ratio_mean"], t(1.772085))
    assert all(not m.requires_grad and m.dim() == 0 for m in metrics.values())
    # Clipped and dual-clipped tokens get no gradient; others -A * ratio / 5:
    # t01: -2 * 0.606531 / 5 = -0.242612, t02: -2 * 1.105171 / 5 = -0.442068.
    loss.backward()
    torch.testing.assert_close(logprobs.grad, t([[0.0, -0.242612, -0.442068], [0.0, 0.0, 0.0]]))


def test_clipped_policy_loss_without_dual_clip_and_per_token_advantages():
    logprobs, old, adv, mask = _policy_batch()
    # Without the dual clip, t10 contributes 5 instead of 3: (-2.023403 + 2) / 5 = -0.004681.
    loss, metrics = clipped_policy_loss(logprobs, old, adv, mask, dual_clip=None)
    torch.testing.assert_close(loss, t(-0.004681))
    assert metrics["dual_clip_fraction"].item() == 0.0
    # [R, T] advantages equal to the broadcast [R] ones give the same loss.
    per_token = adv.unsqueeze(-1).expand(2, 3)
    torch.testing.assert_close(clipped_policy_loss(logprobs, old, per_token, mask)[0], t(-0.404681))


def test_clipped_policy_loss_asymmetric_clip():
    # eps_high = 0.28 (clip-higher): ratio e^0.5 = 1.648721, A = 1 -> -min(1.648721, 1.28) = -1.28.
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, _ = clipped_policy_loss(t([[0.5]]), t([[0.0]]), t([1.0]), mask, eps_high=0.28)
    torch.testing.assert_close(loss, t(-1.28))


def test_clipped_policy_loss_huge_log_ratio_stays_finite():
    # lp - lp_old = 1000 would overflow exp; clamped to 20 it is e^20 = 4.85e8, finite, and the
    # dual clip bounds the A < 0 token at 3.
    logprobs = t([[1000.0], [1000.0]], requires_grad=True)
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, _ = clipped_policy_loss(logprobs, torch.zeros(2, 1), t([1.0, -1.0]), mask)
    loss.backward()
    # A = 1: clipped to 1.2 -> -1.2; A = -1: min(4.85e8, 3) = 3. Mean (−1.2 + 3) / 2 = 0.9.
    torch.testing.assert_close(loss, t(0.9))
    assert torch.isfinite(logprobs.grad).all()


def test_clipped_policy_loss_bad_input():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"logprobs has shape \(2, 3\) but old_logprobs has shape \(2, 4\)"):
        clipped_policy_loss(lp, torch.zeros(2, 4), torch.zeros(2), mask)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\)"):
        clipped_policy_loss(lp, lp, torch.zeros(3), mask)
    # Non-finite values are not checked per tensor (a device sync each): they reach the loss, and
    # the training module skips that optimizer step.
    bad = lp.clone()
    bad[1, 2] = float("nan")
    assert torch.isnan(clipped_policy_loss(lp, bad, torch.ones(2), mask)[0])
    assert torch.isnan(clipped_policy_loss(lp, lp, t([0.0, float("nan")]), mask)[0])


def test_check_finite_names_the_tensor():
    check_finite("ok", torch.zeros(3))
    with pytest.raises(NonFiniteError, match="ref_logprobs has 3 non-finite values"):
        check_finite("ref_logprobs", t([float("nan"), float("inf"), float("-inf"), 0.0]))
    assert issubclass(NonFiniteError, ValueError)


# ---------------------------------------------------------------------------------------------
# perception_token_mask
# ---------------------------------------------------------------------------------------------


def _mask_case():
    entropy = torch.ones(4, 5)
    entropy_removed = t(
        [
            # dH = [1, .5, -.5, 2, 0]; eligible {0, 1, 3}; s = [1/2, .5/1.5, -, 2/3, -];
            # k = max(1, floor(0.5 * 3)) = 1 -> {3}.
            [2.0, 1.5, 0.5, 3.0, 1.0],
            # dH = [1, 1, 1, .2, 0]; s = [.5, .5, .5, .1667]; k = floor(0.5 * 4) = 2, but the
            # k-th key 0.5 is tied three times -> {0, 1, 2}.
            [2.0, 2.0, 2.0, 1.2, 1.0],
            # t1 has the largest rise but is padding; eligible {0}; k = max(1, 0) = 1 -> {0}.
            [1.5, 4.0, 1.0, 1.0, 1.0],
            # No entropy rise anywhere -> nothing.
            [1.0, 1.0, 0.9, 1.0, 1.0],
        ]
    )
    response = torch.ones(4, 5, dtype=torch.bool)
    response[2, 1] = False
    return entropy, entropy_removed, response


def test_perception_token_mask_hand_computed():
    entropy, entropy_removed, response = _mask_case()
    mask = perception_token_mask(entropy, entropy_removed, response)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0, 3] = True
    expected[1, :3] = True
    expected[2, 0] = True
    assert mask.dtype == torch.bool
    assert torch.equal(mask, expected)
    # top_ratio = 1 keeps every eligible token: row 0 -> {0, 1, 3}.
    keep_all = perception_token_mask(entropy, entropy_removed, response, top_ratio=1.0)
    assert keep_all[0].nonzero().flatten().tolist() == [0, 1, 3]


def test_perception_token_mask_advantage_gating_is_strict():
    entropy, entropy_removed, response = _mask_case()
    # A = 0 (row 1) and A < 0 (row 2) are gated; row 0 keeps {3}; row 3 had nothing.
    mask = perception_token_mask(entropy, entropy_removed, response, advantages=t([1.0, 0.0, -1.0, 2.0]))
    assert mask.nonzero().tolist() == [[0, 3]]


def test_perception_token_mask_builds_no_graph():
    entropy, entropy_removed, response = _mask_case()
    entropy.requires_grad_()
    entropy_removed.requires_grad_()
    mask = perception_token_mask(entropy * 1.0, entropy_removed * 1.0, response, advantages=t([1.0, 1, 1, 1]))
    assert not mask.requires_grad and mask.grad_fn is None


def test_perception_token_mask_bad_input():
    entropy, entropy_removed, response = _mask_case()
    message = r"entropy has shape \(4, 5\) but entropy_removed has shape \(4, 4\)"
    with pytest.raises(ValueError, match=message):
        perception_token_mask(entropy, entropy_removed[:, :4], response)
    # A NaN entropy makes its token ineligible (NaN > 0 is False); it is not a crash.
    entropy_removed[:] = float("nan")
    assert not perception_token_mask(entropy, entropy_removed, response).any()


@st.composite
def _entropy_rows(draw):
    rows, length = draw(st.integers(1, 4)), draw(st.integers(1, 10))

    def matrix(elements):
        row = st.lists(elements, min_size=length, max_size=length)
        return draw(st.lists(row, min_size=rows, max_size=rows))

    entropy = t(matrix(st.floats(0.0, 5.0, allow_nan=False, width=32)))
    shift = t(matrix(st.floats(-2.0, 2.0, allow_nan=False, width=32)))
    response = torch.tensor(matrix(st.booleans()))
    advantages = t(draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=rows, max_size=rows)))
    return entropy, (entropy + shift).clamp(min=0.0), response, advantages


@FAST
@given(case=_entropy_rows(), top_ratio=st.sampled_from([0.1, 0.25, 0.5, 0.8, 1.0]), gate=st.booleans())
def test_perception_token_mask_properties(case, top_ratio, gate):
    entropy, entropy_removed, response, advantages = case
    mask = perception_token_mask(entropy, entropy_removed, response, top_ratio, advantages if gate else None)
    shift = entropy_removed - entropy
    eligible = (shift > 0) & response
    key = shift / (entropy_removed + 1e-6)
    # Never a padding token or a token whose entropy did not rise.
    assert not (mask & ~eligible).any()
    for row in range(mask.shape[0]):
        selected = mask[row]
        if gate and advantages[row] <= 0:
            assert not selected.any()
            continue
        n = int(eligible[row].sum())
        if n == 0:
            assert not selected.any()
            continue
        k = max(1, math.floor(top_ratio * n))
        keys = key[row][eligible[row]]
        # The selected tokens are the top ones, and exactly k of them unless the k-th is tied.
        if selected.any() and (~selected & eligible[row]).any():
            assert key[row][selected].min() > key[row][~selected & eligible[row]].max()
        kth = keys.sort(descending=True).values[k - 1]
        ties = int((keys == kth).sum())
        if ties == 1:
            assert int(selected.sum()) == k
        else:
            assert k <= int(selected.sum()) < k + ties


# ---------------------------------------------------------------------------------------------
# Contrastive Perception Loss
# ---------------------------------------------------------------------------------------------


def test_contrastive_perception_loss_hand_computed():
    # Token 0: D+ = k3(d=0) = 0, D- = k3(d=-0.5) = 0.106531 -> softplus(-1.06531) = 0.296113.
    # Token 1: D+ = k3(d=0.5) = 0.148721, D- = 0 -> softplus(1.48721) = 1.690971.
    # Token 2: not selected. Loss = (0.296113 + 1.690971) / (2 + 1e-8) = 0.993542.
    lp = t([[-1.0, -1.0, -1.0]], requires_grad=True)
    lp_plus = t([[-1.0, -0.5, -3.0]], requires_grad=True)
    lp_minus = t([[-1.5, -1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss, metrics = contrastive_perception_loss(lp, lp_plus, lp_minus, mask)
    torch.testing.assert_close(loss, t(0.993542))
    torch.testing.assert_close(metrics["cpl"], t(0.993542))
    torch.testing.assert_close(metrics["divergence_preserving"], t(0.148721 / 2))
    torch.testing.assert_close(metrics["divergence_removing"], t(0.106531 / 2))
    # Token 0 has D+ < D- (the views agree with the loss), token 1 D+ > D-: direction 1 / 2.
    torch.testing.assert_close(metrics["cpl_direction"], t(0.5))
    # A third selected token certain under every view (D+ = D- = 0) is a tie: it counts half,
    # (1 + 0 + 0.5) / 3, not as a token that pushes the wrong way.
    _, tied = contrastive_perception_loss(
        lp, lp_plus, t([[-1.5, -1.0, -3.0]]), torch.ones(1, 3, dtype=torch.bool)
    )
    torch.testing.assert_close(tied["cpl_direction"], t(1.5 / 3))
    loss.backward()
    # Gradient reaches all three views, but never an unselected token.
    for x in (lp, lp_plus, lp_minus):
        assert x.grad[0, :2].abs().sum() > 0
        assert x.grad[0, 2] == 0
    # Pulling I+ closer: d loss / d lp+ at token 1 = sigmoid(1.48721) * (e^0.5 - 1) / 0.1 / 2
    # = 0.815668 * 0.648721 / 0.2 = 2.645712.
    torch.testing.assert_close(lp_plus.grad[0, 1], t(2.645678))


def test_contrastive_perception_loss_full_kl_hand_computed():
    # D+ = KL(p || p) = 0, D- = KL([.5, .5] || [.25, .75]) = 0.143841 -> softplus(-1.43841) = 0.212935.
    p = t([[[0.5, 0.5]]]).log().requires_grad_()
    q = t([[[0.25, 0.75]]]).log().requires_grad_()
    plus = p.detach().clone().requires_grad_()
    mask = torch.ones(1, 1, dtype=torch.bool)
    loss, metrics = contrastive_perception_loss_from_divergences(full_kl(p, plus), full_kl(p, q), mask)
    torch.testing.assert_close(loss, t(0.212935))
    torch.testing.assert_close(metrics["divergence_removing"], t(0.143841))
    loss.backward()
    assert p.grad.abs().sum() > 0 and q.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="contrastive_perception_loss_from_divergences"):
        contrastive_perception_loss(p, plus, q, mask, divergence="full_kl")


def test_contrastive_perception_loss_empty_mask_is_zero_and_backward_works():
    lp, lp_plus, lp_minus = (torch.randn(2, 3, requires_grad=True) for _ in range(3))
    loss, metrics = contrastive_perception_loss(lp, lp_plus, lp_minus, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(lp_plus.grad, torch.zeros(2, 3))
    assert metrics["cpl"].item() == 0.0


@FAST
@given(
    lp=st.lists(st.floats(-15.0, 0.0, width=32), min_size=1, max_size=6),
    offset=st.floats(-3.0, 3.0, width=32),
    tau=st.sampled_from([0.05, 0.1, 1.0]),
)
def test_cpl_is_log2_when_the_divergences_are_equal(lp, offset, tau):
    logprobs = t([lp])
    view = logprobs + offset  # the same log-probs under both views -> D+ == D-
    mask = torch.ones_like(logprobs, dtype=torch.bool)
    loss, _ = contrastive_perception_loss(logprobs, view, view.clone(), mask, tau=tau)
    # softplus(0) = ln 2 = 0.693147; the 1e-8 in the denominator is below float32 resolution.
    assert loss.item() == pytest.approx(LOG2, rel=1e-6)


@FAST
@given(
    lp=st.floats(-10.0, -0.125, width=32),
    plus_offset=st.floats(-0.25, 0.25, width=32),
    gaps=st.lists(st.floats(0.5, 15.0, width=32), min_size=2, max_size=2, unique=True),
)
def test_cpl_vanishes_as_the_removing_divergence_dominates(lp, plus_offset, gaps):
    logprobs, plus = t([[lp]]), t([[lp + plus_offset]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    gaps_sorted = sorted(gaps)
    losses = [contrastive_perception_loss(logprobs, plus, logprobs - g, mask)[0].item() for g in gaps_sorted]
    assert losses[1] <= losses[0] < LOG2  # more removing divergence, less loss
    # Removing ln-prob by 10 gives D- = e^-10 + 9 = 9.00005 vs D+ <= k3(0.25) = 0.0340:
    # softplus(-(9.0 - 0.034) / 0.1) = e^-89.7 ~ 0.
    far = contrastive_perception_loss(logprobs, plus, logprobs - 10.0, mask)[0].item()
    assert far < 1e-30


def test_contrastive_perception_loss_bad_input():
    lp = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    message = r"logprobs has shape \(2, 3\) but logprobs_removing has shape \(3, 3\)"
    with pytest.raises(ValueError, match=message):
        contrastive_perception_loss(lp, lp, torch.zeros(3, 3), mask)
    bad = lp.clone()
    bad[1, 1] = float("nan")
    assert torch.isnan(contrastive_perception_loss(lp, bad, lp, mask)[0])
    with pytest.raises(ValueError, match="unknown divergence 'js'"):
        contrastive_perception_loss(lp, lp, lp, mask, divergence="js")


# ---------------------------------------------------------------------------------------------
# PAPO terms
# ---------------------------------------------------------------------------------------------


def test_implicit_perception_loss_hand_computed():
    # Token 0: k3(d = -1.5 - -1 = -0.5) = 0.106531; token 1: k3(d = 0.5) = 0.148721; token 2
    # padding. Loss = -(0.106531 + 0.148721) / 2 = -0.127626 (minimising it widens the gap).
    lp = t([[-1.0, -2.0, -1.0]], requires_grad=True)
    masked = t([[-1.5, -1.5, -9.0]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = implicit_perception_loss(lp, masked, mask)
    torch.testing.assert_close(loss, t(-0.127626))
    torch.testing.assert_close(metrics["implicit_perception_loss"], t(-0.127626))
    loss.backward()
    # d/d lp of -k3/2 = -(1 - e^d)/2: token 0: -(1 - 0.606531)/2 = -0.196735.
    torch.testing.assert_close(lp.grad[0, 0], t(-0.196735))


def test_double_entropy_loss_hand_computed():
    # 0.5 * mean(1, 2) + 0.1 * mean(3, 4) = 0.75 + 0.35 = 1.1; the padded token is ignored.
    lp = t([[-1.0, -2.0, -50.0]])
    masked = t([[-3.0, -4.0, -50.0]])
    mask = torch.tensor([[True, True, False]])
    loss, metrics = double_entropy_loss(lp, masked, mask, eta_original=0.5, eta_masked=0.1)
    torch.testing.assert_close(loss, t(1.1))
    torch.testing.assert_close(metrics["double_entropy"], t(1.1))

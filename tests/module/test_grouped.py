"""The grouped forward (update.shared_prefix) computes exactly what one row per rollout computes.

Every family of the architecture table, float64, gradient checkpointing on: the log-probs, entropies,
perception masks, divergences, reference log-probs and logged metrics of one mini-batch agree with the
per-row path to 1e-10 relative, its gradient to float32 rounding (see the test), and each image is
encoded once per rollout batch.
"""

import pytest
import torch

from cppo_lightning.architectures import ARCHITECTURES
from cppo_lightning.models import PolicyConfig
from cppo_lightning.models.grouped import PrefixGroups, Segment, grouping_refusal
from cppo_lightning.objectives import CPPO, GRPO, PAPO
from cppo_lightning.update import UpdateConfig
from helpers import handmade_rollout, prompt_batch, small_module

QUESTIONS = ["How many?", "Is the red circle to the left of the blue square above the line?", "Colour?"]
# 3 prompts x G=4, lengths 1..11 (a one-token completion reads only its prompt's last state), advantages of
# both signs in every group (CPPO's views go to the A > 0 rows only: 2 of 4 per group).
LENGTHS = [11, 2, 7, 5, 1, 9, 4, 11, 6, 3, 10, 8]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 2.0, -1.0, -1.0, 0.0, 0.3, 0.7, -0.2, -0.8]
FAMILIES = ("qwen2_5_vl", "llava", "qwen3_vl", "qwen3_5", "gemma3", "idefics3")
OBJECTIVES = {
    "grpo": lambda: GRPO(beta=0.05),
    "cppo": lambda: CPPO(cpl_weight=1.0, beta=0.05),
    "papo": lambda: PAPO(perception_weight=0.5, entropy_weight_original=0.1, beta=0.05),
}


def _folder(family, tiny_qwen, tiny_llava, tiny_families):
    return {"qwen2_5_vl": tiny_qwen, "llava": tiny_llava}.get(family) or tiny_families(family)


def _double(batch):
    batch.vision = {
        view: [{k: v.double() if v.is_floating_point() else v for k, v in ex.items()} for ex in examples]
        for view, examples in batch.vision.items()
    }
    return batch


GC = True
# A token budget under which a group's packed forward (each prompt once per view) no longer fits: groups
# are split across micro-batches (each part with its own prompt copy), rows of one row per rollout too.
BUDGET = 120


def _run(folder, objective, finetuning, update):
    """One mini-batch's scores, metrics and gradient in float64 (fresh module, same seed)."""
    torch.manual_seed(0)
    module = small_module(folder, objective=objective, update=update)
    module.policy_config = PolicyConfig(str(folder), finetuning=finetuning, gradient_checkpointing=GC)
    module.configure_model()
    module.policy.double()
    module.policy.model.train()
    batch = _double(prompt_batch(folder, QUESTIONS))
    rollout = handmade_rollout(batch, 4, LENGTHS, advantages=ADVANTAGES)
    updater = module.policy_update()
    scorer = updater.score(batch, rollout)
    module.policy.model.zero_grad(set_to_none=True)
    step, _ = updater.accumulate_gradients(scorer, list(range(len(rollout))), record=True)
    grads = torch.cat([p.grad.flatten() for p in module.policy.trainable_parameters() if p.grad is not None])
    return scorer, step, rollout, grads


def _close(actual, expected, what, rtol=1e-10, atol=0.0):
    # Diagnostics hold NaN where a row has no value (no I- view): the same places in both.
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN in different places"
    actual, expected = actual.nan_to_num(), expected.nan_to_num()
    scale = expected.abs().max().clamp(min=1e-30)
    difference = float((actual - expected).abs().max())
    error = difference / float(scale)
    assert error < rtol or difference <= atol, f"{what}: relative difference {error:.2e}"


CASES = [
    (family, objective, finetuning)
    for index, family in enumerate(FAMILIES)
    for number, objective in enumerate(OBJECTIVES)
    # LoRA and full fine-tuning alternate over the families and objectives: each family and each
    # objective runs both.
    for finetuning in [("lora", "full")[(index + number) % 2]]
]


@pytest.mark.parametrize("family, objective, finetuning", CASES, ids=["-".join(case) for case in CASES])
def test_grouped_scores_and_gradients_equal_one_row_per_rollout(
    family, objective, finetuning, tiny_qwen, tiny_llava, tiny_families
):
    folder = _folder(family, tiny_qwen, tiny_llava, tiny_families)
    # A token budget that splits the mini-batch into several micro-batches (the CPL's advance selection
    # runs) and a group across two of them.
    budget = dict(micro_batch_rollouts=None, max_tokens_per_forward=BUDGET)
    grouped = _run(folder, OBJECTIVES[objective](), finetuning, UpdateConfig(shared_prefix=True, **budget))
    rows = _run(folder, OBJECTIVES[objective](), finetuning, UpdateConfig(shared_prefix=False, **budget))
    (g_scorer, g_step, g_rollout, g_grad), (r_scorer, r_step, r_rollout, r_grad) = grouped, rows
    assert r_grad.norm() > 0
    # The forward is exact (the log-probs are bit-identical in practice); the gradient goes through
    # transformers' RMSNorms, which compute in float32 even in a float64 model, so summing the G rows'
    # gradients before a norm (grouped) or after it (per row) differs by float32 rounding (~1e-8 here).
    _close(g_grad, r_grad, "gradient", rtol=1e-6)
    _close(g_scorer.precomputed.ref_logprobs, r_scorer.precomputed.ref_logprobs, "reference log-probs")
    for key, value in r_step.sums.items():  # logged in float32, summed over different micro-batches
        _close(g_step.sums[key], value, key, rtol=1e-6, atol=1e-9)
    # Every row's scores under every view the objective reads, from one forward each: 1e-10.
    name = objective
    objective = OBJECTIVES[name]()
    requests = [request for request in objective.view_requests() if request.with_grad]
    view_rows = objective.view_rows(g_scorer.advantages)
    every = g_scorer.micro_batch(range(len(LENGTHS)))
    with torch.no_grad():
        g_inputs = g_scorer.inputs(every, requests, view_rows, entropy=True)
        r_inputs = r_scorer.inputs(every, requests, view_rows, entropy=True)
    _close(g_inputs.logprobs, r_inputs.logprobs, "log-probs")
    _close(g_inputs.entropy, r_inputs.entropy, "entropies")
    for name, scores in r_inputs.views.items():
        _close(g_inputs.views[name].logprobs, scores.logprobs, f"{name} log-probs")
        if scores.entropy is not None:
            _close(g_inputs.views[name].entropy, scores.entropy, f"{name} entropies")
        if scores.divergence is not None:
            _close(g_inputs.views[name].divergence, scores.divergence, f"{name} divergences")
    response = r_rollout.completion_mask
    for diagnostic in ("entropy", "entropy_removed"):  # what the callbacks draw, on response tokens
        expected = getattr(r_rollout, diagnostic)
        if expected is not None:
            _close(getattr(g_rollout, diagnostic)[response], expected[response], diagnostic)
    if name == "cppo":
        assert torch.equal(g_rollout.perception_mask, r_rollout.perception_mask)
        assert r_rollout.perception_mask.any()
    if name == "papo":  # the frozen masked view, scored once before the update
        for view, value in r_scorer.precomputed.views.items():
            _close(g_scorer.precomputed.views[view], value, view)
    assert r_step.micro_batches > 1
    refused = grouping_refusal(g_scorer.model)
    if family == "qwen3_5":  # Gated DeltaNet: refused, scored per row (and still exact)
        assert refused and "Gated DeltaNet" in refused
        assert g_scorer.prompt_tokens_computed == g_scorer.prompt_tokens_per_row
    else:
        assert refused is None
        # Each prompt computed once per view and forward, not once per row (the tight budget splits
        # groups, so less is saved here than in a step without one).
        assert g_scorer.prompt_tokens_computed < g_scorer.prompt_tokens_per_row


def test_every_family_with_a_tiny_builder_is_covered():
    assert set(FAMILIES) == {entry.tiny for entry in ARCHITECTURES.values() if entry.tiny}


def test_the_masks_of_a_layout_are_worked_out_by_hand():
    """Two prompts (3 and 2 tokens), three completions (2, 1 and 0 input tokens), a window of 3."""
    tokens = lambda n: torch.arange(n)  # noqa: E731
    segments = [
        Segment({"input_ids": tokens(3)}, [tokens(2), tokens(1)]),
        Segment({"input_ids": tokens(2)}, [tokens(0)]),
    ]
    groups = PrefixGroups.of(segments, torch.device("cpu"))
    # Flat order: p0 p0 p0 c0 c0 c1 p1 p1 (c2 is empty).
    assert groups.total == 8
    assert groups.prompt_index.tolist() == [[0, 1, 2], [6, 7, 0]]
    assert groups.completion_index.tolist() == [[3, 4], [5, 0], [0, 0]]
    assert groups.completion_segment.tolist() == [0, 0, 1]
    assert groups.last_prompt_token.tolist() == [2, 7]
    prompt, completion = groups.masks(None)
    # The padding query of the short prompt attends causally too (its output is discarded): never an
    # empty row, which would be NaN.
    assert prompt[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # Completion 0 (after a 3-token prompt): the prompt, then causally itself.
    assert completion[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # Completion 1 has one token: no real query attends to its padding slot.
    assert completion[1, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # A window of 3: completion 0 sits at indices 3 and 4 of its row: keys 1-3, then keys 2-4.
    _, windowed = groups.masks(3)
    assert windowed[0, 0].int().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]]


def test_image_tokens_of_one_block_see_each_other_both_ways():
    """Gemma 3's rule: OR(causal, same image block), then AND(sliding window)."""
    blocks = torch.tensor([-1, 0, 0, -1])
    groups = PrefixGroups.of([Segment({"input_ids": torch.arange(4)}, [], blocks)], torch.device("cpu"))
    prompt, _ = groups.masks(None)
    assert prompt[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    prompt, _ = groups.masks(2)
    assert prompt[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def _count_encoded_images(module, during_generation):
    """Images the Qwen vision tower encodes (``grid_thw`` has one row per image), split into those of the
    rollout engine's ``generate`` and the rest (the update)."""
    from cppo_lightning.models.scoring import LanguageModelHead

    counts = {"generation": 0, "update": 0}

    def hook(_, args, kwargs, output):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counts["generation" if during_generation else "update"] += len(grid)

    LanguageModelHead.of(module.policy.model).backbone.visual.register_forward_hook(hook, with_kwargs=True)
    return counts


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_one_cppo_step_under_lora_encodes_each_image_once_for_generation_and_once_for_the_update(
    tiny_qwen, shared_prefix
):
    """2 prompts x G=4, CPPO with the KL term (a reference pass) and micro-batches of 3 rollouts (the
    advance selection runs): generation encodes each prompt's image once, the update each distinct
    (example, view) image once, whatever its passes (reference, selection, gradient)."""
    from helpers import HandWrittenDataModule, quiet_trainer

    module = small_module(
        tiny_qwen,
        objective=CPPO(beta=0.05),
        update=UpdateConfig(micro_batch_rollouts=3, shared_prefix=shared_prefix),
    )
    module.configure_model()
    generating = []
    counts = _count_encoded_images(module, generating)
    original_generate = module.engine.generate

    def generate(*args, **kwargs):
        generating.append(True)
        try:
            return original_generate(*args, **kwargs)
        finally:
            generating.clear()

    module.engine.generate = generate
    trainer = quiet_trainer(1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=2))
    rollout = module.last_rollout
    with_views = {int(e) for e, a in zip(rollout.example_rows, rollout.advantages) if a > 0}
    assert with_views  # the varied reward gives some A > 0 rows
    assert counts["generation"] == 2  # one image per prompt, not G = 4
    if shared_prefix:
        # I for both prompts; I+ and I- for the prompts with an A > 0 row.
        assert counts["update"] == 2 + 2 * len(with_views)
        # Micro-batches of 3 rows split each group of 4 (3 + 1): some prompts computed twice.
        assert 0.0 < float(trainer.callback_metrics["train/prompt_tokens_saved"]) < 0.75
    else:  # one row per rollout and view, in every pass: 8 for the reference pass alone
        assert counts["update"] > 8 + 2 + 2 * len(with_views)
        assert float(trainer.callback_metrics["train/prompt_tokens_saved"]) == 0.0


def test_prompt_runs_find_the_group_size():
    from cppo_lightning.engines.hf import prompt_runs

    prompts, k = prompt_runs(torch.tensor([0, 0, 0, 1, 1, 1]))
    assert prompts.tolist() == [0, 1] and k == 3
    # A call that cuts a group (generation_rollouts not a multiple of G): rows as they are.
    prompts, k = prompt_runs(torch.tensor([0, 0, 0, 1, 1]))
    assert prompts.tolist() == [0, 0, 0, 1, 1] and k == 1
    prompts, k = prompt_runs(torch.tensor([0, 0, 1, 1, 0, 0]))  # a prompt twice: not runs
    assert k == 1


def test_prompt_tokens_saved_is_one_minus_prompts_over_rows(tiny_qwen):
    """GRPO, 2 prompts x G=4 in one micro-batch: each pass computes the 2 prompts instead of 8 rows'
    copies of them, so 1 - (P0 + P1) / (4 P0 + 4 P1) = 0.75 of the prompt tokens are saved."""
    from helpers import HandWrittenDataModule, quiet_trainer

    module = small_module(
        tiny_qwen, objective=GRPO(beta=0.05), update=UpdateConfig(micro_batch_rollouts=None)
    )
    trainer = quiet_trainer(1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=2))
    assert float(trainer.callback_metrics["train/prompt_tokens_saved"]) == pytest.approx(0.75)
    assert float(trainer.callback_metrics["train/forwards"]) == 2  # the reference pass and the gradient pass

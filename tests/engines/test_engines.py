"""The rollout-engine seam, without vLLM: the module's contract with any engine, options, bad input."""

import csv
import importlib.util

import lightning.pytorch as pl
import pytest
import torch

from cli import lightning_cli
from cppo_lightning.batch import ORIGINAL
from cppo_lightning.engines import Generation, HFEngine, VLLMConfig, sampler_logprob_mismatch
from cppo_lightning.models import LoRAConfig, PolicyConfig, load_policy
from cppo_lightning.models.scoring import completion_logits
from cppo_lightning.module import CPPOModule
from cppo_lightning.objectives import GRPO, token_logprobs
from helpers import ROOT, HandWrittenDataModule, count_generate_calls, demo_args, small_module

VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def test_mismatch_is_the_mean_absolute_gap_over_response_tokens():
    sampler = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    policy = torch.tensor([[-1.5, -2.0, -9.0], [-0.25, -7.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # Response tokens: |-1 + 1.5| = 0.5, |-2 + 2| = 0, |-0.5 + 0.25| = 0.25 -> 0.75 / 3; padding ignored.
    assert sampler_logprob_mismatch(sampler, policy, mask).item() == pytest.approx(0.25)
    assert sampler_logprob_mismatch(sampler, policy, torch.zeros_like(mask)).item() == 0.0


def test_generation_rejects_shapes_that_do_not_line_up():
    ids = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="completion_mask"):
        Generation(ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        Generation(ids, torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 3))


class ShiftedSampler:
    """An engine whose sampler is not the policy: HF samples, log-probs reported ``shift`` off the policy's.

    It counts ``sync`` calls and records the policy's parameters at each ``generate``.
    """

    samples_from_policy = False

    def __init__(self, shift):
        self.shift = shift
        self.hf = HFEngine()
        self.syncs = 0
        self.calls = []

    def generate(self, policy, batch, example_rows, config, seed):
        generation = self.hf.generate(policy, batch, example_rows, config, seed)
        ids, mask = generation.completion_ids, generation.completion_mask
        with torch.no_grad():
            logits = completion_logits(policy.model, batch.model_inputs(ORIGINAL, example_rows), ids, mask)
            policy_logprobs = token_logprobs(logits, ids, temperature=config.temperature)
        self.calls.append((len(example_rows), seed, self.syncs))
        generation.sampler_logprobs = (policy_logprobs + self.shift) * generation.completion_mask
        return generation

    def sync(self, policy):
        self.syncs += 1


def fit(module, tiny_qwen, steps, save_dir=None):
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(save_dir) if save_dir else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=4, batch_size=2))
    return trainer


def test_a_sampler_that_is_not_the_policy_is_synced_and_measured(tiny_qwen, tmp_path):
    # 2 prompts x G=4 per step, one optimizer step per rollout.
    module = small_module(tiny_qwen, objective=GRPO(beta=0.0))
    module.configure_model()
    engine = module.engine = ShiftedSampler(shift=0.125)
    trainer = fit(module, tiny_qwen, 3, tmp_path)
    assert trainer.global_step == 3 and engine.syncs == 3  # one sync after every optimizer step
    # Each training rollout (8 rows) came after the sync of the previous rollout's step.
    assert [syncs for rows, _, syncs in engine.calls if rows == 8] == [0, 1, 2]
    # The logged gap is exactly the shift only if lp_old was scored with the policy, not the sampler.
    (metrics,) = list(tmp_path.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    mismatches = [
        float(row["train/sampler_logprob_mismatch"]) for row in rows if row["train/sampler_logprob_mismatch"]
    ]
    assert mismatches == [pytest.approx(0.125, abs=1e-5)] * 3


def test_seeds_handed_to_the_engine_are_reproducible_and_differ_per_step(tiny_qwen):
    def run():
        module = small_module(tiny_qwen)
        module.configure_model()
        module.engine = ShiftedSampler(shift=0.0)
        fit(module, tiny_qwen, 2)
        return [seed for rows, seed, _ in module.engine.calls if rows == 8]

    first = run()
    assert first == run() and len(set(first)) == 2


def test_engine_options_come_from_yaml_and_survive_a_checkpoint():
    cli = lightning_cli(
        [
            "--config",
            str(ROOT / "configs" / "demo" / "grpo.yaml"),
            "--model.rollout.engine",
            "vllm",
            "--model.rollout.vllm.gpu_memory_utilization",
            "0.4",
            "--model.rollout.vllm.max_model_len",
            "2048",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    rollout = cli.model.rollout_config
    assert rollout.engine == "vllm"
    assert rollout.vllm == VLLMConfig(gpu_memory_utilization=0.4, max_model_len=2048)
    # load_from_checkpoint passes the saved hyperparameters back as plain dicts.
    restored = CPPOModule(rollout=cli.model.hparams["rollout"])
    assert restored.rollout_config == rollout


def test_bad_engine_options_are_named(capsys):
    config = str(ROOT / "configs" / "demo" / "grpo.yaml")
    with pytest.raises(SystemExit):
        lightning_cli(["--config", config, "--model.rollout.engine", "vlm"], run=False)
    assert "vlm" in capsys.readouterr().err
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMConfig(gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="sleep_level"):
        VLLMConfig(sleep_level=3)


@pytest.mark.skipif(VLLM_INSTALLED, reason="vLLM is installed here: the error for its absence cannot occur")
def test_vllm_engine_without_vllm_names_the_extra(tiny_qwen, tmp_path):
    with pytest.raises(ImportError, match=r"cppo-lightning\[vllm\]"):
        lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 1, "--model.rollout.engine", "vllm"))


@pytest.mark.parametrize(
    "lora, named",
    [
        ({"include_vision_tower": True}, "model.policy.lora.include_vision_tower to false"),
        ({"include_projector": True}, "model.policy.lora.include_projector to false"),
        # A plain name list reaches the vision MLP too (model.visual.blocks.N.mlp.gate_proj).
        ({"target_modules": r".*\.(q_proj|gate_proj)"}, "model.policy.lora.target_modules"),
    ],
    ids=["vision-tower", "projector", "target-regex"],
)
def test_a_vision_lora_is_refused_at_start_up(tiny_qwen, lora, named):
    from cppo_lightning.engines.vllm import VLLMEngine

    policy = load_policy(PolicyConfig(str(tiny_qwen), lora=LoRAConfig(**lora)), reference=False)
    with pytest.raises(ValueError, match="language model only") as error:
        VLLMEngine(policy, VLLMConfig())
    assert named in str(error.value) and "visual" in str(error.value)


def test_generation_in_calls_of_at_most_generation_rollouts_rows_gives_the_same_completions(
    vllm_model, prompts
):
    """8 rows in calls of 3, 3 and 2 decode greedily to the one-call result, padding included.

    One token greedy decoding often picks is made an end-of-sequence token, so rows end at different
    lengths, and a call whose rows all end early returns a narrower block, which is padded back.
    """
    from cppo_lightning.rollout import repeat_rows
    from cppo_lightning.sampling import EvaluationSampling

    policy = load_policy(PolicyConfig(str(vllm_model), finetuning="full"), reference=False)
    rows = repeat_rows(prompts, 2, torch.device("cpu"))
    settings = dict(samples_per_prompt=2, temperature=0.0, max_new_tokens=12)
    whole = HFEngine().generate(policy, prompts, rows, EvaluationSampling(**settings), seed=0)
    counts = whole.completion_ids[whole.completion_mask].bincount()
    config = policy.unwrapped().generation_config
    config.eos_token_id = [*eos_and_pad_ids(config), int(counts.argmax())]
    whole = HFEngine().generate(policy, prompts, rows, EvaluationSampling(**settings), seed=0)
    lengths = whole.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs completions of different lengths"
    widths = [int(lengths[start : start + 3].max()) for start in (0, 3, 6)]
    assert min(widths) < whole.completion_ids.shape[1], "the test needs a call that returns a narrower block"

    calls = count_generate_calls(policy.model)
    split = HFEngine().generate(
        policy, prompts, rows, EvaluationSampling(**settings, generation_rollouts=3), seed=0
    )
    # Rows [0, 0, 1], [1, 2, 2], [3, 3]: the last call holds one prompt's two samples, passed once.
    assert calls == [3, 3, 1]
    assert torch.equal(split.completion_mask, whole.completion_mask)
    # Padding included: generate fills finished rows with the pad id, and so does the narrower call's padding.
    assert torch.equal(split.completion_ids, whole.completion_ids)


@pytest.mark.parametrize("temperature, generation_rollouts", [(1.0, None), (0.7, 3)])
def test_the_hf_engine_reports_the_log_probs_the_update_scores(
    vllm_model, prompts, temperature, generation_rollouts
):
    """Recorded while sampling, one step behind: equal to a re-scoring forward to float rounding, also
    across calls of ``generation_rollouts`` rows padded to one width, and at another temperature."""
    from cppo_lightning.rollout import repeat_rows
    from cppo_lightning.sampling import RolloutConfig

    policy = load_policy(PolicyConfig(str(vllm_model), finetuning="full"), reference=False)
    rows = repeat_rows(prompts, 2, torch.device("cpu"))
    config = RolloutConfig(
        samples_per_prompt=2,
        temperature=temperature,
        max_new_tokens=10,
        generation_rollouts=generation_rollouts,
    )
    torch.manual_seed(0)
    generation = HFEngine(report_logprobs=True).generate(policy, prompts, rows, config, seed=0)
    ids, mask = generation.completion_ids, generation.completion_mask
    with torch.no_grad():
        logits = completion_logits(policy.model, prompts.model_inputs(ORIGINAL, rows), ids, mask)
        expected = token_logprobs(logits, ids, temperature=temperature) * mask
    assert generation.sampler_logprobs.shape == ids.shape and (generation.sampler_logprobs[~mask] == 0).all()
    torch.testing.assert_close(generation.sampler_logprobs, expected, atol=1e-5, rtol=0)
    assert (expected[mask] < -1).any()  # a random model: far from a trivially certain distribution
    # Recording does not change what is sampled.
    torch.manual_seed(0)
    plain = HFEngine().generate(policy, prompts, rows, config, seed=0)
    assert plain.sampler_logprobs is None and torch.equal(plain.completion_ids, ids)


def eos_and_pad_ids(config):
    eos = config.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def test_generation_rollouts_is_checked_at_start_up():
    from cppo_lightning.sampling import RolloutConfig

    with pytest.raises(ValueError, match="generation_rollouts must be an integer >= 1"):
        RolloutConfig(generation_rollouts=0)
    with pytest.raises(ValueError, match="generation_rollouts must be an integer >= 1"):
        RolloutConfig(generation_rollouts=True)
    with pytest.raises(ValueError, match="generation_rollouts applies to engine: hf"):
        RolloutConfig(engine="vllm", generation_rollouts=8)


def test_synced_generation_makes_as_many_calls_on_every_rank(vllm_model, tmp_path):
    """Under synced_gpus a rank with fewer rows still makes every rank's number of generate calls.

    Rank 0 holds 4 rows and rank 1 only 2, in calls of at most 2: without the extra call, rank 0's second
    call would wait forever on rank 1's decoding steps (the test's timeout).
    """
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = ROOT / "tests" / "engines" / "synced_generation.py"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        OMP_NUM_THREADS="1",
    )
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(vllm_model), str(tmp_path / f"rank{rank}.json")],
            env=dict(env, RANK=str(rank)),
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        errors = [process.communicate(timeout=180)[1] for process in ranks]
    finally:
        for process in ranks:
            process.kill()
    assert [process.returncode for process in ranks] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # Every call holds one prompt's two greedy samples, decoded once (one input row per call).
    assert results[0] == {"calls": [1, 1], "rows": 4}
    # Rank 1's second call decodes its last row again, and its completions are only its own 2 rows.
    assert results[1] == {"calls": [1, 1], "rows": 2}


def test_validation_generates_within_the_rollouts_generation_bound(tiny_qwen):
    """generation_rollouts bounds the rows decoded at once in validation too: the card's limit, not the stage's."""
    from cppo_lightning.sampling import RolloutConfig

    module = small_module(
        tiny_qwen, rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=6, generation_rollouts=3)
    )
    module.configure_model()
    calls = count_generate_calls(module.policy.model)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    trainer.validate(module, datamodule=HandWrittenDataModule(tiny_qwen, count=4, batch_size=2))
    # One validation batch: 2 questions x avg@2 = 4 rows, in calls of at most 3.
    assert calls == [3, 1]

"""Values that cannot work are refused at start-up, before anything loads; a reward function's bad return
value names the function and the value."""

from types import SimpleNamespace

import pytest
import torch

from cli import lightning_cli
from cppo_lightning.models import LoRAConfig, PolicyConfig
from cppo_lightning.module import EvaluationConfig
from cppo_lightning.rewards import RewardFunctions
from cppo_lightning.sampling import RolloutConfig
from datamodules import DataSource, SyntheticVQADataModule, VisualQADataModule
from helpers import demo_args


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RolloutConfig(temperature=0), "rollout: temperature must be a finite number > 0, got 0"),
        (lambda: RolloutConfig(temperature=float("nan")), "temperature must be a finite number > 0"),
        (lambda: RolloutConfig(max_new_tokens=0), "rollout: max_new_tokens must be an integer >= 1, got 0"),
        (lambda: RolloutConfig(samples_per_prompt=0), "samples_per_prompt must be an integer >= 1"),
        (lambda: RolloutConfig(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (lambda: RolloutConfig(top_k=-1), "top_k must be an integer >= 0"),
        (lambda: EvaluationConfig(temperature=-1.0), "evaluation: temperature must be"),
        (lambda: EvaluationConfig(samples_per_question=0), "samples_per_question must be an integer >= 1"),
        (lambda: EvaluationConfig(max_new_tokens=0), "evaluation: max_new_tokens must be"),
        (
            lambda: PolicyConfig(finetuning="qlorra"),
            "finetuning must be 'lora', 'qlora' or 'full', got 'qlorra'",
        ),
        (lambda: PolicyConfig(dtype="float8"), "dtype 'float8' is not one of"),
        (lambda: PolicyConfig(model_name_or_path=" "), "model_name_or_path is empty"),
        (lambda: LoRAConfig(r=0), "lora: r must be an integer >= 1"),
        (lambda: LoRAConfig(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (lambda: LoRAConfig(target_modules="(q_proj"), "target_modules is not a valid regex"),
        (
            lambda: VisualQADataModule(max_pixels=100, min_pixels=200),
            r"min_pixels \(200\) is larger than max_pixels",
        ),
        (lambda: VisualQADataModule(eval_batch_size=0), "eval_batch_size must be >= 1"),
        (lambda: VisualQADataModule(views=["original", "blurred"]), r"unknown views \['blurred'\]"),
        (lambda: VisualQADataModule(max_skip_fraction=1.5), r"max_skip_fraction must be in \[0, 1\]"),
        (lambda: SyntheticVQADataModule(train_size=-1), "sizes must be integers >= 0"),
        (lambda: DataSource(path="x.parquet", max_samples=0), "max_samples must be >= 1"),
    ],
)
def test_values_that_cannot_work_are_refused_when_the_config_is_built(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--model.rollout.temperature", "0", "temperature must be a finite number > 0"),
        ("--model.rollout.max_new_tokens", "0", "max_new_tokens must be an integer >= 1"),
    ],
)
def test_cppo_fit_refuses_them_before_loading_anything(
    tiny_qwen, tmp_path, monkeypatch, option, value, message
):
    import cppo_lightning.module as module

    def never(*args, **kwargs):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(module, "load_policy_on", never)
    with pytest.raises(ValueError, match=message):  # when the config is instantiated: nothing loaded yet
        lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 1, option, value))
    assert not (tmp_path / "grpo").exists()  # no run folder either


def batch(count):
    """What RewardFunctions reads of a PromptBatch: one prompt, its answer and id."""
    return SimpleNamespace(
        answers=["3"] * count,
        ids=[f"q{i}" for i in range(count)],
        metadata=[{}] * count,
        questions=["?"] * count,
    )


def returns_none(prompts, completions, answers, **columns):
    return None


def returns_nones(prompts, completions, answers, **columns):
    return [None] * len(completions)


def returns_strings(prompts, completions, answers, **columns):
    return ["1.0"] * len(completions)


def returns_one(prompts, completions, answers, **columns):
    return [1.0]


def returns_tensor(prompts, completions, answers, **columns):
    return torch.tensor([0.5, True])


@pytest.mark.parametrize(
    ("function", "error", "message"),
    [
        (
            returns_none,
            TypeError,
            r"reward function 'returns_none' returned None \(NoneType\); it must return a list of 2",
        ),
        (
            returns_nones,
            TypeError,
            r"'returns_nones' returned \[None, None\]: value 0 is None \(NoneType\), not a number",
        ),
        (
            returns_strings,
            TypeError,
            r"'returns_strings' returned \['1.0', '1.0'\]: value 0 is '1.0' \(str\)",
        ),
        (returns_one, ValueError, r"'returns_one' returned 1 values for 2 completions: \[1.0\]"),
    ],
)
def test_a_bad_reward_value_names_the_function_and_the_value(function, error, message):
    model = RewardFunctions({function: 1.0})
    with pytest.raises(error, match=message):
        model(batch(1), torch.tensor([0, 0]), ["a", "b"])


def test_numbers_in_any_container_are_accepted(tiny_qwen):
    rewards, terms = RewardFunctions({returns_tensor: 2.0})(batch(1), torch.tensor([0, 0]), ["a", "b"])
    assert rewards.tolist() == [1.0, 2.0] and terms["returns_tensor"].tolist() == [0.5, 1.0]


def test_completions_longer_than_the_model_context_are_refused_at_set_up(tiny_qwen, tmp_path):
    # The tiny model has 4,096 positions (text_config.max_position_embeddings).
    with pytest.raises(
        ValueError, match=r"model.rollout.max_new_tokens \(5003\) \+ the longest prompt \((\d+) tokens, "
    ):
        lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 1, "--model.rollout.max_new_tokens", "5003"))
    # The prompt counts too: 4,050 new tokens fit alone but not after the data's longest prompt.
    with pytest.raises(ValueError) as raised:
        lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 1, "--model.rollout.max_new_tokens", "4050"))
    message = str(raised.value)
    prompt = int(message.split("the longest prompt (")[1].split(" tokens")[0])
    assert 4050 + prompt > 4096 and f"= {4050 + prompt} tokens exceed the context length" in message
    assert "(4096 positions): lower model.rollout.max_new_tokens or data.max_prompt_tokens" in message
    assert not list(tmp_path.rglob("*.ckpt"))  # refused before any step

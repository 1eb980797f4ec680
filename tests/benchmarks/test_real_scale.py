"""The real-scale benchmark's arithmetic: tensor memory, the depth extrapolation, its reward and data."""

import sys

import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import real_scale  # noqa: E402
from memory import TensorMemory  # noqa: E402


def test_tensor_memory_is_the_peak_of_live_tensors_in_the_block():
    kept = torch.empty(2**16)  # allocated before: not counted
    with TensorMemory("cpu") as meter:
        first = torch.empty(2**18)  # 1 MiB of fp32
        second = torch.empty(2**18)  # 1 MiB: 2 MiB live
        del second
        third = torch.empty(2**17)  # 0.5 MiB after a free: 1.5 MiB live, below the peak
    assert meter.peak == 2 * 2**20
    del kept, first, third


def test_resident_bytes_count_parameters_gradients_optimizer_state_once():
    layer = torch.nn.Linear(3, 4)  # weight 12 + bias 4 fp32 = 64 bytes
    tied = torch.nn.Module()
    tied.a, tied.b = layer, torch.nn.Linear(3, 4)
    tied.b.weight = layer.weight  # the same storage twice: counted once
    assert real_scale.resident_tensor_bytes(tied) == 64 + 4 * 4
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    # + gradients 64, + Adam's two moments 128, + a float32 step counter per parameter 2 x 4.
    assert real_scale.resident_tensor_bytes(layer, [optimizer]) == 64 + 64 + 128 + 8
    # One layer of a stack: its own tensors and their optimizer state only.
    stack = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))  # 64 and 40 bytes
    adam = torch.optim.AdamW(stack.parameters())
    stack(torch.ones(1, 3)).sum().backward()
    adam.step()
    assert real_scale.layer_resident_bytes(stack, "1", adam) == 40 + 40 + 80 + 8


def test_fit_line_through_two_points_and_least_squares_through_three():
    assert real_scale.fit_line([(2, 5.0), (4, 9.0)]) == pytest.approx((1.0, 2.0))
    # mean x 2, mean y 8/3; b = ((-1)(-5/3) + (1)(4/3)) / 2 = 1.5; a = 8/3 - 3 = -1/3.
    assert real_scale.fit_line([(1, 1.0), (2, 3.0), (3, 4.0)]) == pytest.approx((-1 / 3, 1.5))
    with pytest.raises(ValueError, match="two different depths"):
        real_scale.fit_line([(2, 1.0), (2, 2.0)])


def run_result(text_layers, vision_layers, resident, transient, scale=1):
    """A benchmark result with one measured step: resident + per-phase transient memory, token counts."""
    memory = {
        phase: {"resident": resident, "transient": transient[phase], "peak": resident + transient[phase]}
        for phase in real_scale.FIT_PHASES
    }
    step = {
        "warmup": False,
        "seconds": {phase: 1.0 for phase in real_scale.FIT_PHASES},
        "memory": {phase: {**values, "reserved": None} for phase, values in memory.items()},
        "completion_tokens": 10 * scale,
        "prompt_tokens": 30 * scale,
        "largest_forward_tokens": {"reference": 100 * scale, "gradient": 200 * scale},
    }
    return {
        "text_layers": text_layers,
        "vision_layers": vision_layers,
        "text_layer_resident": 100.0,
        "vision_layer_resident": 10.0,
        "steps": [step],
    }


def test_extrapolation_adds_counted_layers_and_follows_the_fitted_transient():
    runs = [
        run_result(2, 2, 1000.0, {"rollout": 50.0, "reference": 20.0, "gradient": 70.0}),
        run_result(4, 4, 1220.0, {"rollout": 90.0, "reference": 20.0, "gradient": 110.0}),
    ]
    out = real_scale.extrapolate(runs, text_layers=36, vision_layers=32)
    # Resident: the 4-layer run's 1220 + 32 text layers x 100 + 28 vision blocks x 10 = 4700.
    assert out["rollout"]["resident"] == pytest.approx(4700.0)
    # Transient: 50 -> 90 over 2 layers, b = 20, a = 10; at 36 layers 10 + 720 = 730.
    assert (out["rollout"]["a"], out["rollout"]["b"]) == pytest.approx((10.0, 20.0))
    assert out["rollout"]["peak"] == pytest.approx(4700.0 + 730.0)
    # A phase whose transient does not grow with depth stays where it was.
    assert out["reference"]["transient"] == pytest.approx(20.0)


def test_alternating_reward_gives_half_the_rollouts_positive_advantages():
    from cppo_lightning.objectives import group_advantages

    rewards = torch.tensor(real_scale.alternating_reward([""] * 10, [""] * 10, [""] * 10))
    advantages = group_advantages(rewards, 5)
    # G = 5 and 1, 0, 1, 0, 1 | 0, 1, 0, 1, 0: 3 and 2 rows with A > 0.
    assert (advantages > 0).view(2, 5).sum(1).tolist() == [3, 2]


@pytest.mark.parametrize(
    "tokens, size", [(256, (448, 448)), (512, (448, 896)), (1024, (896, 896)), (16, (112, 112))]
)
def test_random_images_have_exactly_the_asked_visual_tokens(tokens, size):
    dataset = real_scale.random_image_dataset(2, tokens)
    # Qwen2.5-VL: one visual token per 28 x 28 pixels (14 px patches merged 2 x 2).
    assert dataset[0]["image"].size[::-1] == size and size[0] * size[1] // 784 == tokens
    assert dataset["id"] == ["random-0", "random-1"]


def test_module_arguments_keep_the_configs_settings_and_force_the_lengths():
    config = real_scale.load_config(real_scale.DEFAULT_CONFIG)
    options = real_scale.parse_args(["--new-tokens", "64", "--group", "3"])
    arguments = real_scale.module_arguments(config, "/some/model", options)
    assert arguments["policy"]["model_name_or_path"] == "/some/model"
    assert arguments["policy"]["finetuning"] == "qlora" and arguments["policy"]["lora"]["r"] == 64
    assert arguments["rollout"]["min_new_tokens"] == arguments["rollout"]["max_new_tokens"] == 64
    assert arguments["rollout"]["samples_per_prompt"] == 3
    assert arguments["update"]["max_tokens_per_forward"] == 8192
    assert arguments["objective"]["class_path"].endswith("CPPO")
    optimizer = arguments["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    assert type(optimizer).__name__ == "AdamW" and optimizer.defaults["lr"] == 2.0e-5
    assert arguments["reward_functions"] == {"real_scale.alternating_reward": 1.0}


def test_estimate_at_other_sizes_splits_what_grows_with_tokens_and_layers():
    runs = [
        run_result(2, 2, 1000.0, {"rollout": 50.0, "reference": 20.0, "gradient": 70.0}),
        run_result(4, 4, 1220.0, {"rollout": 90.0, "reference": 20.0, "gradient": 110.0}),
    ]
    depth = real_scale.extrapolate(runs, 36, 32)
    # The rollout phase grows with 40 tokens (prompt + completion): gamma = b / 40 = 0.5 per layer-token.
    # A run with twice the tokens at 2 layers: transient 120 = alpha + beta * 80 + 0.5 * 2 * 80, and
    # a = 10 = alpha + beta * 40, so beta = (120 - 80 - 10) / 40 = 0.75 and alpha = 10 - 30 = -20.
    bigger = run_result(2, 2, 1000.0, {"rollout": 120.0, "reference": 20.0, "gradient": 70.0}, scale=2)
    target = {"tokens": {"rollout": 400.0, "reference": 100.0, "gradient": 200.0}}
    out = real_scale.estimate_at_sizes(depth, [bigger], target, text_layers=36)
    assert (out["rollout"]["alpha"], out["rollout"]["beta"], out["rollout"]["gamma"]) == pytest.approx(
        (-20.0, 0.75, 0.5)
    )
    assert out["rollout"]["transient"] == pytest.approx(-20.0 + 0.75 * 400 + 0.5 * 36 * 400)
    # Without a run at other sizes the depth-independent part is taken as proportional to the tokens.
    alone = real_scale.estimate_at_sizes(depth, [], target, text_layers=36)
    assert alone["rollout"]["transient"] == pytest.approx(10.0 / 40 * 400 + 0.5 * 36 * 400)


def test_config_sizes_plan_the_shipped_qlora_step():
    config = real_scale.load_config(real_scale.DEFAULT_CONFIG)
    # 512 visual tokens + 88 text tokens: rows of 600 + 1,024 = 1,624 tokens, 80 rollouts generated in
    # calls of 40 (generation_rollouts): the KV cache holds 40 rows.
    sizes = real_scale.config_sizes(config, 88)
    assert sizes["tokens"]["rollout"] == 40 * 1624
    config["model"]["rollout"]["generation_rollouts"] = None
    assert real_scale.config_sizes(config, 88)["tokens"]["rollout"] == 80 * 1624
    # No-grad scoring: 5 rows fill the 8,192-token budget (8,120; a sixth would need 9,744).
    assert sizes["tokens"]["reference"] == 5 * 1624
    # CPPO's gradient pass: rows alternate A > 0 (three stacked views) and A <= 0 (one): 3 + 1 rows = 6,496,
    # one more A > 0 row would need 11,368.
    assert sizes["tokens"]["gradient"] == 4 * 1624
    grpo_config = real_scale.load_config(str(real_scale.DEFAULT_CONFIG).replace("cppo", "grpo"))
    assert real_scale.config_sizes(grpo_config, 88)["tokens"]["gradient"] == 5 * 1624

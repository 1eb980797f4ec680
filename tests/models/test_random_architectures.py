"""Released architectures with random weights: the shapes of Qwen2.5-VL-3B/7B, depth cuts, random: specs,
and one CPPO step at the 3B's full width (real vocabulary, M-RoPE sections, vision merger)."""

import json
import shutil

import pytest
import torch

from cppo_lightning.models import PolicyConfig, load_processor, resolve_model_path
from cppo_lightning.models.tiny import (
    REAL_ARCHITECTURES,
    parse_random_spec,
    real_architecture_config,
    resolve_random_spec,
)
from cppo_lightning.objectives import CPPO
from cppo_lightning.sampling import RolloutConfig
from helpers import HandWrittenDataModule, quiet_trainer


def meta_model(name, **depths):
    from transformers import Qwen2_5_VLForConditionalGeneration

    config, tokenizer, _ = real_architecture_config(name, **depths)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    return config, tokenizer, model


@pytest.mark.parametrize(
    "name, shards_gb, hidden, vocab, kv_width, tied",
    [
        # Qwen/Qwen2.5-VL-3B-Instruct: two bf16 shards of 3.98 and 3.53 GB; 2 kv heads x 128.
        ("qwen2_5_vl-3b", 3.98 + 3.53, 2048, 151936, 2 * 128, True),
        # A full bf16 fine-tune of Qwen2.5-VL-7B-Instruct (same config.json): shards 4.97 + 4.99 + 4.93 + 1.69 GB.
        ("qwen2_5_vl-7b", 4.97 + 4.99 + 4.93 + 1.69, 3584, 152064, 4 * 128, False),
    ],
)
def test_released_shapes(name, shards_gb, hidden, vocab, kv_width, tied):
    config, tokenizer, model = meta_model(name)
    parameters = sum(p.numel() for p in model.parameters())  # tied weights once
    # The checkpoint's bf16 size, 2 bytes a parameter, within the shards' rounding to 0.01 GB each.
    assert abs(2 * parameters / 1e9 - shards_gb) < 0.02, parameters
    language = model.model.language_model
    assert model.lm_head.weight.shape == (vocab, hidden)
    assert (model.lm_head.weight is language.embed_tokens.weight) == tied
    assert language.layers[0].self_attn.k_proj.out_features == kv_width
    assert config.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    # M-RoPE splits head_dim / 2 = 64 frequencies over time, height and width.
    assert (
        sum(config.text_config.rope_parameters["mrope_section"])
        == hidden // config.text_config.num_attention_heads // 2
    )
    visual = model.model.visual
    assert len(visual.blocks) == 32 and visual.blocks[0].attn.qkv.weight.shape == (3 * 1280, 1280)
    # The merger concatenates 2 x 2 patches (4 x 1280) and projects to the text width.
    assert visual.merger.mlp[0].in_features == 4 * 1280 and visual.merger.mlp[-1].out_features == hidden
    assert config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    # The vocabulary is real even though the tokenizer is small: its ids all fit.
    assert len(tokenizer) < vocab


@pytest.mark.parametrize(
    "vision_layers, full_attention", [(1, [0]), (2, [1]), (8, [7]), (16, [7, 15]), (32, [7, 15, 23, 31])]
)
def test_depth_cut_keeps_width_and_both_attention_kinds(vision_layers, full_attention):
    config, _, _ = real_architecture_config("qwen2_5_vl-3b", text_layers=2, vision_layers=vision_layers)
    assert config.text_config.num_hidden_layers == 2 and len(config.text_config.layer_types) == 2
    assert config.text_config.hidden_size == 2048 and config.text_config.vocab_size == 151936
    assert config.vision_config.depth == vision_layers
    assert config.vision_config.fullatt_block_indexes == full_attention


def test_random_specs_parse_and_bad_ones_name_the_problem():
    assert parse_random_spec("random:qwen2_5_vl-7b@text_layers=2,vision_layers=3,seed=4,dtype=float32") == {
        "name": "qwen2_5_vl-7b",
        "text_layers": 2,
        "vision_layers": 3,
        "seed": 4,
        "dtype": "float32",
    }
    assert parse_random_spec("random:qwen2_5_vl-3b") == {"name": "qwen2_5_vl-3b"}
    for spec, words in [
        ("random:qwen2_5_vl-13b", "qwen2_5_vl-3b"),
        ("random:qwen2_5_vl-3b@layers=2", "unknown"),
        ("random:qwen2_5_vl-3b@text_layers=2,text_layers=3", "repeated"),
        ("random:qwen2_5_vl-3b@text_layers=two", "integer"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_random_spec(spec)
    with pytest.raises(ValueError, match=r"text_layers must be an integer in 1\.\.36"):
        resolve_random_spec("random:qwen2_5_vl-3b@text_layers=37")
    assert set(REAL_ARCHITECTURES) == {"qwen2_5_vl-3b", "qwen2_5_vl-7b"}


def test_min_new_tokens_cannot_exceed_max():
    with pytest.raises(ValueError, match="min_new_tokens"):
        RolloutConfig(max_new_tokens=4, min_new_tokens=5)


def alternating_reward(prompts, completions, answers, **columns):
    """1, 0 within each group of G = 2: one rollout per prompt has A > 0."""
    return [float(index % 2 == 0) for index in range(len(completions))]


@pytest.fixture(scope="module")
def random_3b_one_layer():
    """The 3B at full width with 1 text and 1 vision layer, built through its random: spec (bf16, 0.9 GB),
    deleted after the module's tests."""
    spec = "random:qwen2_5_vl-3b@text_layers=1,vision_layers=1"
    folder = resolve_model_path(spec)
    yield spec, folder
    shutil.rmtree(folder, ignore_errors=True)


def test_random_spec_builds_the_real_image_processor(random_3b_one_layer):
    spec, folder = random_3b_one_layer
    assert (
        json.loads((__import__("pathlib").Path(folder) / "random_vlm.json").read_text())["text_layers"] == 1
    )
    processor = load_processor(spec)
    image_processor = processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (
        14,
        2,
        2,
    )
    import numpy as np

    # 448 x 896 px = 32 x 64 patches of 14 px, merged 2 x 2: 512 visual tokens; 56 x 56 (min_pixels): 4.
    for (height, width), tokens in [((448, 896), 512), ((56, 56), 4)]:
        image = np.zeros((height, width, 3), np.uint8)
        out = processor(
            images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>"], return_tensors="pt"
        )
        assert int(out["image_grid_thw"].prod()) // 4 == tokens
        assert (
            int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())
            == tokens
        )


def test_one_cppo_step_at_the_3b_full_width(random_3b_one_layer):
    """The real-width path in CI: 151,936-token LM head in chunks, M-RoPE [16, 24, 24] over 4 visual tokens
    and 4 exact-length completions, the merger 5120 -> 2048, the I+/I- rows of the A > 0 rollouts."""
    from cppo_lightning.module import CPPOModule, UpdateConfig

    spec, _ = random_3b_one_layer
    module = CPPOModule(
        # Loaded in float32: on a CPU without bf16 instructions the backward's bf16 matmuls against the
        # 151,936 x 2,048 head and the 11,008-wide MLP run at about 0.1 GFLOP/s (275 s for this step on
        # 2 cores, against 33 s in float32).
        policy=PolicyConfig(spec, finetuning="lora", dtype="float32"),
        objective=CPPO(),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=4, min_new_tokens=4),
        update=UpdateConfig(micro_batch_rollouts=None),
        reward_functions={alternating_reward: 1.0},
        optimizer=lambda parameters: torch.optim.AdamW(parameters, lr=1e-3),
    )
    module.configure_model()
    assert module.policy.unwrapped().lm_head.weight.shape == (151936, 2048)
    before = {n: p.detach().clone() for n, p in module.policy.model.named_parameters() if p.requires_grad}
    trainer = quiet_trainer(1)
    trainer.fit(module, datamodule=HandWrittenDataModule(spec, count=2, batch_size=2))
    rollout = module.last_rollout
    # Exactly 4 tokens each, though a random model samples end-of-sequence tokens freely.
    assert rollout.completion_mask.sum(1).tolist() == [4, 4, 4, 4]
    assert (rollout.advantages > 0).tolist() == [True, False, True, False]
    # CPPO computed its views: entropies under I- for the A > 0 rows only (NaN where not computed).
    removed = rollout.entropy_removed
    assert torch.isfinite(removed[rollout.advantages > 0]).all()
    assert torch.isnan(removed[rollout.advantages <= 0]).all()
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and metrics["train/micro_batches"] == 1
    assert set(module.phase_seconds) == {"rollout", "scoring", "reference", "gradient"}
    assert float(metrics["time/reference_s"]) + float(metrics["time/gradient_s"]) <= float(
        metrics["time/update_s"]
    )
    after = dict(module.policy.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)

"""Policy loading: LoRA targets, the reference policy, gradient checkpointing, full fine-tuning, bad input."""

import re

import pytest
import torch

from cppo_lightning.models import (
    LoRAConfig,
    PolicyConfig,
    load_policy,
    resolve_model_path,
    vision_tower,
)
from cppo_lightning.models.scoring import completion_logits
from helpers import encode


def lora_layers(model):
    """Names of the modules that received a LoRA adapter."""
    return sorted(
        {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}
    )


def fixed_batch(policy, length=6, seed=0):
    inputs = encode(policy.processor, ["How many red shapes?", "Is there a green star?"], seed=seed)
    completion = torch.randint(20, 200, (2, length), generator=torch.Generator().manual_seed(seed))
    return inputs, completion, torch.ones_like(completion, dtype=torch.bool)


def nll(model, inputs, completion, mask):
    logits = completion_logits(model, inputs, completion, mask)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), completion.flatten())


def test_default_lora_wraps_only_language_model_projections(tiny_vlm):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm)))
    layers = lora_layers(policy.model)
    assert policy.model.training  # from_pretrained gives eval mode; training needs train mode
    # 2 decoder layers x (q, k, v, o, gate, up, down) = 14 projections, all in the language model.
    assert len(layers) == 14
    assert all(".language_model." in name for name in layers)
    assert all(re.search(r"\.(q|k|v|o|gate|up|down)_proj$", name) for name in layers)
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # The vision tower has layers named like the targets (Qwen's vision MLP has gate/up/down_proj)...
    tower = vision_tower(policy.unwrapped())
    assert tower is not None and not any("lora_" in name for name, _ in tower.named_parameters())


def test_vision_tower_and_projector_can_be_adapted(tiny_qwen):
    lora = LoRAConfig(include_vision_tower=True, include_projector=True)
    layers = lora_layers(load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen), lora=lora)).model)
    vision = [name for name in layers if ".visual.blocks." in name]
    projector = [name for name in layers if ".visual.merger." in name]
    # 2 vision blocks x (qkv, proj, gate, up, down) = 10; the merger MLP has 2 linear layers.
    assert len(vision) == 10 and len(projector) == 2
    assert len(layers) == 14 + 10 + 2


def test_disabled_adapters_give_the_base_model_exactly_after_training(tiny_vlm):
    from transformers import AutoModelForImageTextToText

    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm), lora=LoRAConfig(r=4, alpha=8)))
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm).eval()
    inputs, completion, mask = fixed_batch(policy)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        nll(policy.model, inputs, completion, mask).backward()
        optimizer.step()
    with torch.no_grad():
        trained = completion_logits(policy.model, inputs, completion, mask)
        with policy.reference() as reference:
            reference_logits = completion_logits(reference, inputs, completion, mask)
        base_logits = completion_logits(base, inputs, completion, mask)
    assert not torch.allclose(trained, base_logits, atol=1e-3)  # the adapter did change the policy
    assert torch.equal(reference_logits, base_logits)
    # Leaving the context re-enables the adapters.
    with torch.no_grad():
        assert torch.equal(completion_logits(policy.model, inputs, completion, mask), trained)


def test_full_finetuning_keeps_a_frozen_reference(tiny_qwen):
    policy = load_policy(
        PolicyConfig(model_name_or_path=str(tiny_qwen), finetuning="full", freeze_vision_tower=True)
    )
    assert policy.reference_mode == "frozen_copy"
    assert not any(p.requires_grad for p in vision_tower(policy.model).parameters())
    assert not any(p.requires_grad for p in policy.reference_model.parameters())
    inputs, completion, mask = fixed_batch(policy)
    with torch.no_grad(), policy.reference() as reference:
        before = completion_logits(reference, inputs, completion, mask)
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    nll(policy.model, inputs, completion, mask).backward()
    optimizer.step()
    with torch.no_grad(), policy.reference() as reference:
        assert torch.equal(completion_logits(reference, inputs, completion, mask), before)
        assert not torch.allclose(completion_logits(policy.model, inputs, completion, mask), before)


def test_no_reference_when_not_asked(tiny_qwen):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen), finetuning="full"), reference=False)
    assert policy.reference_model is None
    with pytest.raises(RuntimeError, match="without a reference"):
        with policy.reference():
            pass


def test_gradient_checkpointing_with_lora_reaches_every_adapter(tiny_vlm):
    config = PolicyConfig(model_name_or_path=str(tiny_vlm), gradient_checkpointing=True)
    policy = load_policy(config)
    base = policy.unwrapped()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    policy.model.train()
    inputs, completion, mask = fixed_batch(policy)
    nll(policy.model, inputs, completion, mask).backward()
    lora_a = {n: p for n, p in policy.model.named_parameters() if "lora_A" in n}
    lora_b = {n: p for n, p in policy.model.named_parameters() if "lora_B" in n}
    assert len(lora_a) == len(lora_b) == 14
    # B starts at zero, so A's gradient is zero at step 0; B's gradient is nonzero everywhere.
    assert all(p.grad is not None for p in lora_a.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values())


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_policy(PolicyConfig(model_name_or_path=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_text_only_model_is_rejected(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a vision-language model"):
        load_policy(PolicyConfig(model_name_or_path=str(tmp_path)))


def test_lora_pattern_matching_nothing_is_a_clear_error(tiny_qwen):
    lora = LoRAConfig(target_modules=r".*language_model.*\.query_key_value")
    with pytest.raises(ValueError, match="matches no linear layer.*named like"):
        load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen), lora=lora))
    with pytest.raises(ValueError, match="not a valid regex"):
        load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen), lora=LoRAConfig(target_modules="(")))


@pytest.mark.parametrize(
    "name, targeted",
    [
        ("model.language_model.layers.0.self_attn.q_proj", True),
        ("model.language_model.layers.11.mlp.down_proj", True),
        ("base_model.model.model.language_model.layers.3.mlp.gate_proj", True),
        # The Qwen vision MLP has the same projection names: a bare name list would hit it.
        ("model.visual.blocks.0.mlp.gate_proj", False),
        ("model.visual.blocks.0.attn.qkv", False),
        ("model.visual.merger.mlp.0", False),
        ("lm_head", False),
        ("model.language_model.embed_tokens", False),
    ],
)
def test_default_lora_targets_are_the_language_models_projections_only(name, targeted):
    # peft matches a string target_modules with re.fullmatch against the module name.
    assert bool(re.fullmatch(LoRAConfig().target_regex(), name)) is targeted


@pytest.mark.parametrize(
    ("finetuning", "device", "device_map", "moved_to"),
    [
        ("qlora", "cuda:1", {"": torch.device("cuda:1")}, None),  # quantized on its GPU while loading
        ("qlora", "cpu", None, torch.device("cpu")),
        ("lora", "cuda:1", None, torch.device("cuda:1")),
        ("full", None, None, None),  # no device: loaded on the CPU, nothing moved
    ],
)
def test_load_policy_on_places_only_a_qlora_policy_on_a_gpu_while_loading(
    monkeypatch, finetuning, device, device_map, moved_to
):
    """The one placement rule of training, evaluation and the audit (no GPU needed: the load is recorded)."""
    import cppo_lightning.models.loading as loading

    calls = {}

    class Loaded:
        def to(self, target):
            calls["moved_to"] = target
            return self

    def record(config, reference=True, device_map=None, processor=None):
        calls["device_map"], calls["reference"] = device_map, reference
        return Loaded()

    monkeypatch.setattr(loading, "load_policy", record)
    config = PolicyConfig("tiny:qwen2_5_vl-demo", finetuning=finetuning)
    loading.load_policy_on(config, device, reference=False)
    assert calls["device_map"] == device_map and calls["reference"] is False
    assert calls.get("moved_to") == moved_to
    calls.clear()
    loading.load_policy_on(config, device, move=False)  # training: Lightning's strategy moves it
    assert "moved_to" not in calls and calls["reference"] is True

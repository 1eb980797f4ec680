"""Tiny offline VLMs: build, save, reload through the loader, generate; deterministic for a seed."""

import json

import pytest
import torch

from cppo_lightning.models import PolicyConfig, build_tiny_vlm, load_policy, load_processor, resolve_tiny_spec
from helpers import encode


def test_each_architecture_reloads_and_generates(tiny_vlm):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm)))
    inputs = encode(policy.processor, ["How many red shapes?", "Is there a blue circle to the left?"])
    prompt_length = inputs["input_ids"].shape[1]
    # Left padding: the shorter prompt starts with padding, both end on the assistant turn.
    assert inputs["attention_mask"][:, -1].all() and not inputs["attention_mask"][0].all()
    torch.manual_seed(0)
    sequences = policy.model.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    assert sequences.shape == (2, prompt_length + 6)
    assert torch.equal(sequences[:, :prompt_length], inputs["input_ids"])
    # Structural tokens (image placeholders ...) are never sampled.
    suppressed = policy.unwrapped().generation_config.suppress_tokens
    assert suppressed and not torch.isin(sequences[:, prompt_length:], torch.tensor(suppressed)).any()


def test_same_seed_same_model_other_seed_other_weights(tmp_path):
    first = build_tiny_vlm(tmp_path / "a", "qwen2_5_vl", "smoke", seed=1)
    again = build_tiny_vlm(tmp_path / "b", "qwen2_5_vl", "smoke", seed=1)
    other = build_tiny_vlm(tmp_path / "c", "qwen2_5_vl", "smoke", seed=2)
    assert (first / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    from safetensors.torch import load_file

    a, b, c = (load_file(folder / "model.safetensors") for folder in (first, again, other))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    # The run's own state does not leak: building does not consume the global RNG.
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    build_tiny_vlm(tmp_path / "d", "llava", "smoke", seed=0)
    assert torch.equal(torch.rand(1), expected)


def test_demo_size_has_a_few_million_parameters(tmp_path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(build_tiny_vlm(tmp_path / "d", "qwen2_5_vl", "demo"))
    count = sum(p.numel() for p in model.parameters())
    assert 2_000_000 < count < 10_000_000, count


def test_tiny_spec_builds_once_into_the_cache():
    folder = resolve_tiny_spec("tiny:llava-smoke@seed=4")
    assert json.loads((folder / "tiny_vlm.json").read_text()) == {
        "architecture": "llava",
        "size": "smoke",
        "seed": 4,
        "image_size": 224,
    }
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_tiny_spec("tiny:llava-smoke@seed=4") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    processor = load_processor("tiny:llava-smoke@seed=4")
    assert type(processor).__name__ == "LlavaProcessor"


@pytest.mark.parametrize("spec", ["tiny:gpt2-smoke", "tiny:qwen2_5_vl-huge", "tiny:qwen2_5_vl"])
def test_malformed_tiny_spec_names_the_problem(spec):
    with pytest.raises(ValueError, match="tiny"):
        resolve_tiny_spec(spec)

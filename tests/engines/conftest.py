"""Fixtures of the rollout-engine tests: a tiny VLM vLLM's CPU backend can run, and prompts for it."""

import pytest


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    """A tiny fp32 Qwen2.5-VL with head_dim 32 (hidden 128, 4 heads): vLLM's CPU attention needs >= 32."""
    from transformers import AutoConfig

    from cppo_lightning.models import build_tiny_vlm

    folder = build_tiny_vlm(tmp_path_factory.mktemp("tiny-vllm"), "qwen2_5_vl", "small", seed=0)
    text = AutoConfig.from_pretrained(folder).text_config
    assert text.hidden_size // text.num_attention_heads == 32
    return folder


@pytest.fixture(scope="session")
def prompts(vllm_model):
    """4 synthetic image + question prompts (112 px: 16 image tokens each), with I, I+ and I-."""
    from datamodules import SyntheticTaskConfig, SyntheticVQADataModule

    data = SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=112),
        train_size=4,
        val_size=0,
        test_size=0,
        batch_size=4,
        processor_name_or_path=str(vllm_model),
    )
    data.setup("fit")
    return next(iter(data.train_dataloader()))

"""The newer VLM families (Qwen3-VL, Qwen3.5, Gemma 3, Idefics3/SmolVLM) through the whole CPPO path.

Each family's tiny model: ``generate`` and the update's re-scoring agree, default LoRA adapts the
language model's projections only, QLoRA quantizes the language model only and trains, and one CPPO
step runs on the synthetic task through the data side (the table's image sizing, the same-layout check
of the three views). Models are smoke-size and built once per session (``tiny_families``).
"""

import re

import pytest
import torch

from cppo_lightning.architectures import ARCHITECTURES, TEXT_KEYS, architecture, architecture_of
from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING, concat_vision_inputs
from cppo_lightning.models import PolicyConfig, completion_mask, load_policy, load_processor, vision_tower
from cppo_lightning.models.tiny import _BUILDERS
from cppo_lightning.module import UpdateConfig
from cppo_lightning.rollout import Rollout
from cppo_lightning.sampling import RolloutConfig
from cppo_lightning.update import RolloutScorer
from helpers import prompt_batch, quiet_trainer, random_images, small_module

# The families with a tiny builder beside the two the rest of the suite covers (conftest's `tiny_family`).
NEW_FAMILIES = tuple(
    e.tiny for e in ARCHITECTURES.values() if e.tiny and e.tiny not in ("qwen2_5_vl", "llava")
)
QUESTIONS = ["How many?", "Is the red circle to the left of the blue square?", "Colour?"]

# Default LoRA targets of the smoke models (2 decoder layers), worked out from each family's layer
# layout: 2 x (q, k, v, o, gate, up, down) = 14, except Qwen3.5 whose first layer is Gated DeltaNet
# (in_proj_qkv, in_proj_z, out_proj + the MLP's 3 = 6) and second full attention (7): 13.
LORA_TARGETS = {"qwen3_vl": 14, "qwen3_5": 13, "gemma3": 14, "idefics3": 14}
# Linear layers QLoRA makes 4-bit: every language-model linear (Qwen3.5 adds in_proj_a/in_proj_b: 15).
QUANTIZED = {"qwen3_vl": 14, "qwen3_5": 15, "gemma3": 14, "idefics3": 14, "llava": 14}


def test_every_table_entry_with_a_tiny_builder_builds_its_own_model_type(tiny_families):
    tiny = [entry for entry in ARCHITECTURES.values() if entry.tiny]
    assert {entry.tiny for entry in tiny} == set(_BUILDERS)
    assert set(NEW_FAMILIES) == {"qwen3_vl", "qwen3_5", "gemma3", "idefics3"}  # conftest's tiny_family
    for entry in tiny:
        if entry.tiny in ("qwen2_5_vl", "llava"):
            continue  # the session fixtures tiny_qwen / tiny_llava cover them in tests/models/test_tiny.py
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(tiny_families(entry.tiny)).model_type == entry.model_type


def test_the_update_scores_equal_generate_s_own(tiny_family):
    """RolloutScorer re-scores generate's samples to generate's own log-probs (left-padded prompts)."""
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_family)), reference=False)
    model = policy.model.eval()
    batch = prompt_batch(tiny_family, QUESTIONS)
    assert (batch.attention_mask.sum(1) != batch.prompt_length).any()  # really left-padded
    torch.manual_seed(0)
    out = model.generate(
        **batch.model_inputs(ORIGINAL),
        max_new_tokens=8,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[:, batch.prompt_length :]
    mask = completion_mask(completion, policy.unwrapped().generation_config.eos_token_id)
    assert mask.sum() > len(batch)  # something to compare beyond the first token
    rollout = Rollout(
        torch.arange(len(batch)), completion, mask, [""] * len(batch), torch.zeros(3), {}, torch.zeros(3), 1
    )
    # All rows in one micro-batch: the prompts stay left-padded, as in a training step.
    scorer = RolloutScorer(model, batch, rollout, temperature=1.0, max_rows=len(batch), chunk_tokens=5)
    (micro,) = scorer.plan(range(len(batch)), [1] * len(batch))
    with torch.no_grad():
        inputs = scorer.inputs(micro, [], torch.zeros(3, dtype=torch.bool), entropy=False)
    rows = torch.as_tensor(micro.rows)  # the plan orders rows by length
    raw = torch.stack(out.logits, dim=1)[rows, : micro.completion_length].float()
    expected = torch.log_softmax(raw, -1).gather(-1, completion[rows, : micro.completion_length, None])[
        ..., 0
    ]
    response = inputs.response_mask
    torch.testing.assert_close(inputs.logprobs[response], expected[response], atol=1e-4, rtol=1e-4)


def test_default_lora_adapts_the_language_model_s_projections_only(tiny_family):
    """... and, with gradient checkpointing on (as every shipped config has it), every adapter learns."""
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_family), gradient_checkpointing=True))
    base = policy.unwrapped()
    arch = architecture_of(base)
    layers = sorted(
        {n.rsplit(".lora_A", 1)[0] for n, _ in policy.model.named_modules() if n.endswith(".lora_A")}
    )
    assert len(layers) == LORA_TARGETS[base.config.model_type]
    assert all(arch.is_language_model(name) for name in layers)
    assert all(name.rsplit(".", 1)[1] in arch.lora_projections for name in layers)
    assert not any("lora_" in name for name, _ in vision_tower(base).named_parameters())
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    if base.config.model_type == "qwen3_5":  # the linear-attention layer's projections are adapted too
        assert any(name.endswith("linear_attn.in_proj_qkv") for name in layers)
    policy.model.train()
    logits = policy.model(**prompt_batch(tiny_family, QUESTIONS[:2]).model_inputs(ORIGINAL)).logits
    logits[:, -3:].logsumexp(-1).sum().backward()
    lora_b = {n: p for n, p in policy.model.named_parameters() if "lora_B" in n}
    # B starts at zero, so only B has a gradient at step 0: nonzero for every adapted layer.
    assert len(lora_b) == len(layers) and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b.values()
    )


@pytest.mark.parametrize("family", [*NEW_FAMILIES, "llava"])
def test_qlora_quantizes_the_language_model_only_and_trains(family, tiny_families, request):
    import bitsandbytes as bnb

    tiny_family = request.getfixturevalue("tiny_llava") if family == "llava" else tiny_families(family)

    torch.manual_seed(0)
    policy = load_policy(
        PolicyConfig(
            model_name_or_path=str(tiny_family), finetuning="qlora", bnb_4bit_compute_dtype="float32"
        )
    )
    base = policy.unwrapped()
    arch = architecture_of(base)
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == QUANTIZED[base.config.model_type]
    assert all(arch.is_language_model(name) for name in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_tower(base).modules())
    assert not isinstance(base.get_output_embeddings(), bnb.nn.Linear4bit)
    batch = prompt_batch(tiny_family, QUESTIONS[:2])
    policy.model.eval()
    with torch.no_grad():
        sequences = policy.model.generate(**batch.model_inputs(ORIGINAL), max_new_tokens=4)
    assert sequences.shape[1] > batch.prompt_length
    policy.model.train()
    logits = policy.model(**batch.model_inputs(ORIGINAL)).logits
    logits[:, -1].logsumexp(-1).sum().backward()
    grads = [p.grad for p in policy.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_a_cppo_step_through_the_data_side(tiny_family):
    """The synthetic task's three views share one token layout for every family; one CPPO step trains."""
    from datamodules.synthetic import SyntheticTaskConfig
    from datamodules.vqa import SyntheticVQADataModule

    data = SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=64),
        train_size=2,
        val_size=0,
        test_size=0,
        batch_size=2,
        processor_name_or_path=str(tiny_family),
    )
    module = small_module(
        tiny_family,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        rollout=RolloutConfig(samples_per_prompt=2, max_new_tokens=6),
        update=UpdateConfig(micro_batch_rollouts=4),
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.model.named_parameters() if p.requires_grad}
    trainer = quiet_trainer(1, limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1
    after = dict(module.policy.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # The views the step used: one set of tokens, three different images.
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    views = [batch.model_inputs(view) for view in (ORIGINAL, PRESERVING, REMOVING)]
    for view in views[1:]:
        assert all(torch.equal(view[key], views[0][key]) for key in TEXT_KEYS if key in view)
        assert not torch.equal(view["pixel_values"], views[0]["pixel_values"])


def test_image_sizing_follows_the_table(tiny_families):
    """Dynamic-resolution families round to patch x merge; fixed-size and tiled ones leave it to the processor."""
    from datamodules.vqa import SyntheticVQADataModule

    factors = {}
    for name in ("qwen3_vl", "gemma3", "idefics3"):
        data = SyntheticVQADataModule(
            train_size=1, val_size=0, test_size=0, processor_name_or_path=str(tiny_families(name))
        )
        factors[name] = data.image_limits().factor
    # Qwen3-VL: patch 16 x merge 2; Gemma 3 resizes to its fixed square, Idefics3 to its tiles.
    assert factors == {"qwen3_vl": 32, "gemma3": 1, "idefics3": 1}


def test_idefics3_examples_with_different_tile_counts_batch_as_if_alone(tiny_families):
    """Zero-padded tiles (a wide and a square image) leave each example's logits as computed alone."""
    from transformers import AutoModelForImageTextToText

    from cppo_lightning.models import chat_prompt

    folder = tiny_families("idefics3")
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    text = chat_prompt(processor, "How many?")
    wide, square = random_images(1, size=(32, 96))[0], random_images(1, size=(64, 64), seed=1)[0]
    alone = [dict(processor(images=[image], text=[text], return_tensors="pt")) for image in (wide, square)]
    tiles = [part["pixel_values"].shape[1] for part in alone]
    assert tiles == [3, 5]  # 1 x 2 tiles + the global view; 2 x 2 + the global view
    # Same prompt text, but the tile markers differ: only the vision inputs are batched here, and each
    # row keeps its own tokens (one row per forward pass of the text, to compare).
    vision = concat_vision_inputs([{k: v for k, v in part.items() if k not in TEXT_KEYS} for part in alone])
    assert vision["pixel_values"].shape[1] == max(tiles)
    with torch.no_grad():
        for row, part in enumerate(alone):
            expected = model(**part).logits
            padded = {k: v[row : row + 1] for k, v in vision.items()}
            got = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], **padded).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_an_unknown_model_type_gets_the_generic_entry_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        entry = architecture("some_new_vlm")
    assert entry.generic and re.fullmatch(
        entry.lora_targets, "model.language_model.layers.0.self_attn.q_proj"
    )
    assert "some_new_vlm" in caplog.text and "not in cppo_lightning's architecture table" in caplog.text


def test_the_table_s_lora_regex_never_reaches_the_vision_side():
    qwen3_vl = architecture("qwen3_vl")
    assert re.fullmatch(qwen3_vl.lora_targets, "model.language_model.layers.3.mlp.gate_proj")
    assert not re.fullmatch(qwen3_vl.lora_targets, "model.visual.blocks.0.mlp.linear_fc1")
    idefics = architecture("idefics3")
    assert re.fullmatch(idefics.lora_targets, "model.text_model.layers.0.self_attn.o_proj")
    assert not re.fullmatch(idefics.lora_targets, "model.vision_model.encoder.layers.0.self_attn.q_proj")


def test_gemma3_projector_lora_is_refused_with_a_clear_message(tiny_families):
    from cppo_lightning.models import LoRAConfig

    config = PolicyConfig(str(tiny_families("gemma3")), lora=LoRAConfig(include_projector=True))
    with pytest.raises(ValueError, match="Gemma 3's vision-language projector has no linear layer"):
        load_policy(config)


def test_the_vllm_engine_refuses_a_family_it_was_not_checked_with_before_starting(tiny_families):
    """vLLM's prompt layout is checked for Qwen2.5-VL only: another family is refused before vLLM loads."""
    from cppo_lightning.engines.vllm import VLLMEngine

    policy = load_policy(PolicyConfig(str(tiny_families("gemma3"))), reference=False)
    with pytest.raises(ValueError, match=r"Gemma 3 \(gemma3\).*model.rollout.engine: hf"):
        VLLMEngine(policy)


def test_every_shipped_training_config_names_a_checkpoint_of_the_table():
    """The configs and the table (and so the README's list) name the same released checkpoints."""
    import yaml

    from helpers import TRAINING_CONFIGS

    known = {hub: entry for entry in ARCHITECTURES.values() for hub in entry.checkpoints}
    configs = [p for p in TRAINING_CONFIGS if p.parent.name != "demo"]  # demo: tiny: specs
    assert len(configs) >= 18
    for path in configs:
        policy = yaml.safe_load(path.read_text())["model"]["policy"]
        assert policy["model_name_or_path"] in known, path


@pytest.mark.parametrize(
    "prompt, expected",
    [
        # Qwen3.5's template (thinking on by default) opens the block in the generation prompt.
        (
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n",
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n",
        ),
        ("<|im_start|>assistant\n<think>", "<|im_start|>assistant\n"),
        # A closed block (thinking off) and a prompt without one stay as they are.
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        ("<|im_start|>assistant\n", "<|im_start|>assistant\n"),
    ],
)
def test_a_generation_prompt_that_opens_think_leaves_it_to_the_completion(prompt, expected):
    from cppo_lightning.models.processors import without_opened_think

    assert without_opened_think(prompt) == expected

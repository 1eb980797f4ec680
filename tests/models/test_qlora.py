"""QLoRA on CPU: a 4-bit NF4 base with LoRA trains, samples and serves as its own reference."""

import torch

from cppo_lightning.models import PolicyConfig, completion_mask, load_policy, vision_tower
from cppo_lightning.models.scoring import completion_logits
from helpers import encode


def test_qlora_rounds_of_generate_train_reference(tiny_qwen):
    import bitsandbytes as bnb

    torch.manual_seed(0)  # LoRA's initialisation
    policy = load_policy(
        PolicyConfig(model_name_or_path=str(tiny_qwen), finetuning="qlora", bnb_4bit_compute_dtype="float32")
    )
    base = policy.unwrapped()
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    # Every language-model projection is 4-bit; the vision tower and the output head are not.
    assert len(quantized) == 14 and all(".language_model." in n for n in quantized)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in vision_tower(base).modules())
    assert isinstance(base.lm_head, torch.nn.Linear) and not isinstance(base.lm_head, bnb.nn.Linear4bit)
    assert all(m.weight.quant_type == "nf4" for n, m in base.named_modules() if n in quantized)

    inputs = encode(policy.processor, ["How many red shapes?", "Is there a green star?"])
    target = torch.randint(20, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    target_mask = torch.ones_like(target, dtype=torch.bool)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=5e-3)
    losses = []
    for step in range(3):
        # generate (eval, no grad) -- the CPU repacking trap would break the next training forward
        policy.model.eval()
        with torch.no_grad():
            torch.manual_seed(step)
            sequences = policy.model.generate(**inputs, max_new_tokens=5)
        completion = sequences[:, inputs["input_ids"].shape[1] :]
        assert completion_mask(completion, base.generation_config.eos_token_id).any()
        # train step on a fixed batch
        policy.model.train()
        optimizer.zero_grad()
        logits = completion_logits(policy.model, inputs, target, target_mask)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        loss.backward()
        grads = [p.grad for p in policy.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        losses.append(loss.item())
        # reference forward: the quantized base without adapters
        with torch.no_grad(), policy.reference() as reference:
            reference_logits = completion_logits(reference, inputs, target, target_mask)
        assert torch.isfinite(reference_logits).all()
    assert losses[2] < losses[1] < losses[0]
    with torch.no_grad():
        trained = completion_logits(policy.model, inputs, target, target_mask)
    assert not torch.allclose(trained, reference_logits, atol=1e-4)


def test_qlora_keeps_the_frozen_vision_side_in_its_loaded_dtype(tiny_qwen):
    """peft's preparation upcasts every unquantized weight to fp32; the frozen vision tower goes back to bf16.

    The 3B's tower is 1.3 GB in bf16 and 2.5 GB in fp32. The language model's norms and embedding/head stay
    fp32, the LoRA adapters train in fp32, and the model still samples and backpropagates, with and without
    autocast.
    """
    policy = load_policy(
        PolicyConfig(
            model_name_or_path=str(tiny_qwen),
            finetuning="qlora",
            dtype="bfloat16",
            bnb_4bit_compute_dtype="bfloat16",
        )
    )
    base = policy.unwrapped()
    assert {p.dtype for p in vision_tower(base).parameters()} == {torch.bfloat16}
    assert base.model.language_model.norm.weight.dtype == torch.float32
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for p in policy.trainable_parameters()} == {torch.float32}

    inputs = encode(policy.processor, ["How many red shapes?", "Is there a green star?"])
    target = torch.randint(20, 200, (2, 6), generator=torch.Generator().manual_seed(0))
    target_mask = torch.ones_like(target, dtype=torch.bool)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            policy.model.eval()
            with torch.no_grad():
                sequences = policy.model.generate(**inputs, max_new_tokens=4)
            assert sequences.shape[1] > inputs["input_ids"].shape[1]
            policy.model.train()
            logits = completion_logits(policy.model, inputs, target, target_mask)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        policy.model.zero_grad()
        loss.backward()
        grads = [p.grad for p in policy.trainable_parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)

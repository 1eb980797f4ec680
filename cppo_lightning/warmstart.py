"""A short supervised stage before RL: teach a (tiny) policy the answer format and some of the task.

RL with verifiable rewards needs a policy that is sometimes right: from random weights every reward is 0
and every advantage too. The CPU demo therefore first fine-tunes the tiny VLM on reference answers
written in the release's format (``<think> ... </think> \\boxed{answer}``), for a budget that leaves it
clearly imperfect, and RL takes it from there.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import lightning.pytorch as pl
import torch
from typing_extensions import override

from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.models.loading import Policy, PolicyConfig, load_policy
from cppo_lightning.models.scoring import completion_logits
from cppo_lightning.seeding import derived_seed, seeded

#: The supervised target: the release's format with a short, generic reasoning.
DEFAULT_TARGET = "<think> I look at the shapes in the image. </think> \\boxed{{{answer}}}"


class WarmStartModule(pl.LightningModule):
    """Supervised fine-tuning on ``target_template.format(answer=...)`` given the image and question.

    Args:
        policy: what to load (default: full fine-tuning).
        target_template: completion text with ``{answer}``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        seed: initialisation seed.
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(finetuning="full"),
        target_template: str = DEFAULT_TARGET,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 20,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if "{answer}" not in target_template:
            raise ValueError(f"target_template must contain '{{answer}}', got {target_template!r}")
        self.policy_config = copy.deepcopy(policy)
        self.target_template = target_template
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.policy: Policy | None = None

    @override
    def configure_model(self) -> None:
        if self.policy is None:
            with seeded(derived_seed(self.seed, "init")):
                self.policy = load_policy(self.policy_config, reference=False)

    def targets(self, answers: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded target ids (ending with EOS) and their mask, ``[B, T]`` each."""
        ids, mask = target_ids(self.policy.processor.tokenizer, self.target_template, answers)
        return ids.to(self.device), mask.to(self.device)

    def loss(self, batch: PromptBatch) -> torch.Tensor:
        """Mean token cross-entropy of the targets."""
        ids, mask = self.targets(batch.answers)
        logits = completion_logits(self.policy.model, batch.model_inputs(ORIGINAL), ids, mask)
        return torch.nn.functional.cross_entropy(logits[mask].float(), ids[mask])

    @override
    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("warmstart/loss", loss, prog_bar=True, batch_size=len(batch))
        return loss

    @override
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self.log("warmstart/val_loss", self.loss(batch), prog_bar=True, batch_size=len(batch))

    @override
    def configure_optimizers(self):
        self.configure_model()
        optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / max(1, self.warmup_steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def save_pretrained(self, folder) -> None:
        """Write the fine-tuned model and its processor (a plain ``transformers`` checkpoint)."""
        from cppo_lightning.export import save_processor

        self.policy.model.save_pretrained(folder)
        save_processor(self.policy.processor, folder, self.policy_config.model_name_or_path)


def target_ids(tokenizer, template: str, answers: Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``template.format(answer=...)`` tokenized and ended with EOS, right-padded: ids and mask, ``[B, T]``."""
    rows = [
        tokenizer(template.format(answer=answer), add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for answer in answers
    ]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = True
    return ids, mask

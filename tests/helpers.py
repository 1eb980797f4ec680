"""Small builders shared by tests (not fixtures: plain functions)."""

import numpy as np
import yaml
from PIL import Image

from cppo_lightning.models import chat_prompt
from datamodules.synthetic import SyntheticTaskConfig


def random_images(count, size=(112, 112), seed=0):
    """``count`` random RGB PIL images."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


def encode(processor, questions, images=None, seed=0):
    """Processor inputs (left-padded) for one image per question."""
    images = images if images is not None else random_images(len(questions), seed=seed)
    texts = [chat_prompt(processor, q) for q in questions]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]

#: The shipped training configs: every YAML under configs/ but configs/eval (they evaluate a model: nothing
#: to train, checkpoint or resume) and configs/audit (transform lists for `cppo audit --candidates`).
TRAINING_CONFIGS = sorted(
    path
    for path in (ROOT / "configs").rglob("*.yaml")
    if path.relative_to(ROOT / "configs").parts[0] not in ("eval", "audit")
)


def demo_args(config, model_path, save_dir, steps=2, *overrides):
    """LightningCLI arguments that shrink a demo config to a few seconds on a CPU."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "demo" / f"{config}.yaml"),
        "--model.policy.model_name_or_path",
        str(model_path),
        "--trainer.max_steps",
        str(steps),
        "--trainer.val_check_interval",
        str(steps),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--data.init_args.train_size",
        "16",
        "--data.init_args.val_size",
        "4",
        "--data.init_args.test_size",
        "4",
        "--data.init_args.batch_size",
        "2",
        "--data.init_args.eval_batch_size",
        "4",
        "--data.init_args.task.image_size",
        "112",
        "--model.rollout.samples_per_prompt",
        "4",
        "--model.rollout.max_new_tokens",
        "10",
        "--model.update.micro_batch_rollouts",
        "8",
        "--model.evaluation.samples_per_question",
        "2",
        *overrides,
    ]


def demo_task(config: str) -> SyntheticTaskConfig:
    """The synthetic task a demo config trains on (``demo_args`` keeps it, with 112 px images)."""
    task = yaml.safe_load((ROOT / "configs" / "demo" / f"{config}.yaml").read_text())["data"]["init_args"][
        "task"
    ]
    return SyntheticTaskConfig(
        **{**task, "image_size": 112, "shape_size_range": tuple(task["shape_size_range"])}
    )


def varied_reward(prompts, completions, answers, **columns):
    """A reward that differs between samples of a random tiny model (so advantages are not all zero)."""
    return [float(len(completion) % 3) for completion in completions]


VARIED_REWARD = ["--model.reward_functions", '{"helpers.varied_reward": 1.0}']


def answer_is_no(prompts, completions, answers, **columns):
    """A grader that only looks at the reference answer: its mean is known without sampling."""
    return [float(answer == "no") for answer in answers]


# ----------------------------------------------------------------------------- a DataModule that is not ours

import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cppo_lightning.batch import TEXT_KEYS, EncodedPrompt, PromptBatch  # noqa: E402

# Each view is one solid colour, so a picture of the views shows which one was drawn where.
VIEW_COLOURS = {"original": (255, 0, 0), "preserving": (0, 255, 0), "removing": (0, 0, 255)}


def solid(colour, size=56):
    """A ``size`` x ``size`` uint8 image of one colour."""
    image = np.zeros((size, size, 3), np.uint8)
    image[...] = colour
    return image


def encoded_prompt(processor, question, images, example_id="ex", answer="0"):
    """One example as the documented contract has it: the processor run on each view alone."""
    text = chat_prompt(processor, question)  # the same tokens for every view
    encoded = {
        view: processor(images=[image], text=[text], return_tensors="pt") for view, image in images.items()
    }
    first = next(iter(encoded.values()))
    return EncodedPrompt(
        id=example_id,
        text_inputs={key: first[key][0] for key in TEXT_KEYS if key in first},
        vision={view: {k: v for k, v in out.items() if k not in TEXT_KEYS} for view, out in encoded.items()},
        answer=answer,
        question=question,
        images=images,
    )


def prompt_batch(model_folder, questions, seed=0):
    """A PromptBatch of random-image prompts with every view (I, I+, I-, masked all differ), left-padded."""
    from cppo_lightning.models import load_processor

    processor = load_processor(model_folder)
    rng = np.random.default_rng(seed)
    examples = []
    for index, question in enumerate(questions):
        images = {
            view: rng.integers(0, 256, (56, 56, 3), dtype=np.uint8) for view in (*VIEW_COLOURS, "masked")
        }
        examples.append(encoded_prompt(processor, question, images, f"ex{index}"))
    return PromptBatch.from_examples(examples, processor.tokenizer.pad_token_id)


class HandWrittenDataModule(pl.LightningDataModule):
    """A DataModule written the way another project would: the documented batch built by hand.

    ``count`` prompts with solid-colour views (no albumentations, no datamodules package), answer
    ``index % 3``; validation is the first two prompts.
    """

    def __init__(self, model_folder, count=6, batch_size=2, question="How many shapes? ({})"):
        super().__init__()
        from cppo_lightning.models import load_processor

        processor = load_processor(model_folder)
        self.pad = processor.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.examples = [
            encoded_prompt(
                processor,
                question.format(index),
                {view: solid(colour) for view, colour in VIEW_COLOURS.items()},
                f"ex{index}",
                str(index % 3),
            )
            for index in range(count)
        ]

    def collate(self, examples):
        return PromptBatch.from_examples(examples, self.pad)

    def train_dataloader(self):
        return DataLoader(self.examples, batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.examples[:2], batch_size=self.batch_size, collate_fn=self.collate)


def quiet_trainer(steps, **kwargs):
    """A CPU Trainer for ``steps`` optimizer steps, without logger, checkpoints or progress output."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def small_module(model_folder, objective=None, **kwargs):
    """A CPPOModule sized for tests: G=4, 12 new tokens, one micro-batch, avg@2, a reward that varies."""
    from cppo_lightning.models import PolicyConfig
    from cppo_lightning.module import CPPOModule, EvaluationConfig, UpdateConfig
    from cppo_lightning.sampling import RolloutConfig

    kwargs.setdefault("rollout", RolloutConfig(samples_per_prompt=4, max_new_tokens=12))
    kwargs.setdefault("update", UpdateConfig(micro_batch_rollouts=8))
    kwargs.setdefault("evaluation", EvaluationConfig(samples_per_question=2))
    kwargs.setdefault("reward_functions", {varied_reward: 1.0})
    return CPPOModule(policy=PolicyConfig(str(model_folder)), objective=objective, **kwargs)


def handmade_rollout(batch, group, lengths, advantages=None, seed=0, pad_token_id=0):
    """A Rollout of ``G`` rows per prompt with random completions of the given lengths (no sampling).

    Token ids are ordinary text tokens (10-199), so that no structural token (an image placeholder)
    lands in a completion. ``advantages`` default: group-normalised random rewards.
    """
    import torch

    from cppo_lightning.objectives import group_advantages
    from cppo_lightning.rollout import Rollout

    generator = torch.Generator().manual_seed(seed)
    rows = len(batch) * group
    lengths = torch.as_tensor(lengths)
    assert lengths.shape == (rows,), "one length per rollout row"
    width = int(lengths.max())
    ids = torch.randint(10, 200, (rows, width), generator=generator)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    ids = ids.masked_fill(~mask, pad_token_id)
    rewards = torch.randint(0, 3, (rows,), generator=generator).float()
    if advantages is None:
        advantages = group_advantages(rewards, group)
    return Rollout(
        example_rows=torch.arange(len(batch)).repeat_interleave(group),
        completion_ids=ids,
        completion_mask=mask,
        completions=[""] * rows,
        rewards=rewards,
        reward_terms={},
        advantages=torch.as_tensor(advantages, dtype=torch.float32),
        group_size=group,
        batch=batch,
    )


# ----------------------------------------------------------------------------- rollout engines


def supervised_step(policy, batch, lr):
    """One Adam step of the policy towards a fixed answer: large enough to change what greedy decoding says."""
    import torch

    from cppo_lightning.batch import ORIGINAL
    from cppo_lightning.models.scoring import completion_logits
    from cppo_lightning.objectives import token_logprobs

    target = torch.tensor(
        policy.processor.tokenizer("<think> I see 3 red shapes. </think> \\boxed{3}")["input_ids"]
    )
    completion = target.expand(len(batch), -1)
    mask = torch.ones_like(completion, dtype=torch.bool)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    logits = completion_logits(policy.model, batch.model_inputs(ORIGINAL), completion, mask)
    (-token_logprobs(logits, completion).mean()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def policy_logprobs(policy, batch, rows, generation, view="original"):
    """[N, C] log-probs of a Generation's tokens re-scored by the policy under one image view."""
    import torch

    from cppo_lightning.models.scoring import completion_logits
    from cppo_lightning.objectives import token_logprobs

    ids, mask = generation.completion_ids, generation.completion_mask
    with torch.no_grad():
        return token_logprobs(completion_logits(policy.model, batch.model_inputs(view, rows), ids, mask), ids)


def mean_gap(a, b, mask):
    """Mean ``|a - b|`` over the True positions of ``mask``."""
    return float(((a - b).abs() * mask).sum() / mask.sum())


class SignalAtStep(pl.Callback):
    """Sends ``signum`` to this process in the middle of RL step ``step`` (0-based), between the rollout
    and the optimizer step: what a Ctrl+C or a scheduler's SIGTERM does at a random moment."""

    def __init__(self, step: int = 1, signum: int = 2, times: int = 1):
        self.step, self.signum, self.times = step, signum, times

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        import os

        if trainer.global_step == self.step:
            for _ in range(self.times):  # times=2: a user pressing Ctrl+C twice
                os.kill(os.getpid(), self.signum)


class SignalDuringValidation(pl.Callback):
    """Sends ``signum`` to this process after validation batch ``batch`` of the first validation in training,
    and records the validation batches that ran (``ran``)."""

    ran: list[int] = []

    def __init__(self, batch: int = 0, signum: int = 15):
        self.batch, self.signum = batch, signum
        SignalDuringValidation.ran = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        import os

        if trainer.sanity_checking:
            return
        SignalDuringValidation.ran.append(batch_idx)
        if batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


def count_generate_calls(model) -> list[int]:
    """Wraps ``model.generate`` (the real one still runs): each call appends its row count to the list returned."""
    calls: list[int] = []
    generate = model.generate

    def counting(**inputs):
        calls.append(len(inputs["input_ids"]))
        return generate(**inputs)

    model.generate = counting
    return calls

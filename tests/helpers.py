"""Small builders shared by tests (not fixtures: plain functions)."""

import numpy as np
from PIL import Image

from cppo_lightning.models import chat_prompt


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


def demo_args(config, model_path, save_dir, steps=2, *overrides):
    """LightningCLI arguments that shrink a demo config to a few seconds on a CPU."""
    return [
        "fit",
        "--config", str(ROOT / "configs" / "demo" / f"{config}.yaml"),
        "--model.policy.model_name_or_path", str(model_path),
        "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir),
        "--data.init_args.train_size", "16",
        "--data.init_args.val_size", "4",
        "--data.init_args.test_size", "4",
        "--data.init_args.batch_size", "2",
        "--data.init_args.eval_batch_size", "4",
        "--data.init_args.task.image_size", "112",
        "--model.rollout.samples_per_prompt", "4",
        "--model.rollout.max_new_tokens", "10",
        "--model.update.micro_batch_size", "8",
        "--model.evaluation.samples_per_question", "2",
        *overrides,
    ]


def varied_reward(prompts, completions, answers, **columns):
    """A reward that differs between samples of a random tiny model (so advantages are not all zero)."""
    return [float(len(completion) % 3) for completion in completions]


VARIED_REWARD = ["--model.reward_functions", '{"helpers.varied_reward": 1.0}']


def answer_is_yes(prompts, completions, answers, **columns):
    """A grader that only looks at the reference answer: its mean is known without sampling."""
    return [float(answer == "yes") for answer in answers]

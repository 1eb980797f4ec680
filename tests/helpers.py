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

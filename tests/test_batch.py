"""The PromptBatch contract: left padding, per-example vision inputs, rows with repeats, clear errors."""

import pytest
import torch

from cppo_lightning.batch import EncodedPrompt, PromptBatch


def example(name, length, patches, views=("original", "removing")):
    return EncodedPrompt(
        id=name,
        text_inputs={
            "input_ids": torch.arange(1, length + 1),
            "attention_mask": torch.ones(length, dtype=torch.long),
            "mm_token_type_ids": torch.zeros(length, dtype=torch.long),
        },
        vision={
            view: {
                "pixel_values": torch.full((patches, 4), float(i)),
                "image_grid_thw": torch.tensor([[1, patches, 1]]),
            }
            for i, view in enumerate(views)
        },
        answer=name.upper(),
    )


def test_from_examples_left_pads_and_keeps_vision_per_example():
    batch = PromptBatch.from_examples([example("a", 3, 2), example("b", 5, 3)], pad_token_id=0)
    assert batch.input_ids.tolist() == [[0, 0, 1, 2, 3], [1, 2, 3, 4, 5]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.text_inputs["mm_token_type_ids"].shape == (2, 5)
    assert batch.views == ("original", "removing") and batch.answers == ["A", "B"]


def test_model_inputs_repeat_rows_and_concatenate_vision():
    batch = PromptBatch.from_examples([example("a", 3, 2), example("b", 5, 3)], pad_token_id=0)
    inputs = batch.model_inputs("removing", torch.tensor([1, 1, 0]))
    assert inputs["input_ids"].shape == (3, 5)
    # Qwen-style flat patches: 3 + 3 + 2 rows, in row order.
    assert inputs["pixel_values"].shape == (8, 4)
    assert inputs["image_grid_thw"].tolist() == [[1, 3, 1], [1, 3, 1], [1, 2, 1]]
    assert torch.all(inputs["pixel_values"] == 1.0)  # the removing view's pixels
    with pytest.raises(KeyError, match="no 'preserving' view"):
        batch.model_inputs("preserving")


def test_bad_batches_name_the_problem():
    with pytest.raises(ValueError, match="example 'b' has views"):
        PromptBatch.from_examples(
            [example("a", 3, 2), example("b", 3, 2, views=("original",))], pad_token_id=0
        )
    with pytest.raises(ValueError, match="needs the 'original' view"):
        PromptBatch.from_examples([example("a", 3, 2, views=("removing",))], pad_token_id=0)
    with pytest.raises(ValueError, match="zero examples"):
        PromptBatch.from_examples([], pad_token_id=0)

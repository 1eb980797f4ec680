"""`cppo export` writes folders plain transformers loads, from any fine-tuning mode, and never over its
input or over files already there (issue 22, items 5 and 10)."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2_5_VLProcessor

from cli import lightning_cli, main
from cppo_lightning.models import load_processor
from helpers import VARIED_REWARD, demo_args, random_images


@pytest.fixture(scope="module")
def lora_run(tiny_qwen, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("lora-run")
    lightning_cli(demo_args("grpo", tiny_qwen, save_dir, 1))
    return save_dir / "grpo" / "version_0"


def test_the_exported_processor_is_transformers_own_class(lora_run, tmp_path):
    output = tmp_path / "merged"
    assert main(["export", str(lora_run / "checkpoints" / "adapter"), str(output)]) == 0
    config = json.loads((output / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2_5_VLProcessor"  # not the project's image-only subclass
    assert (
        json.loads((output / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    )
    video, image = config["video_processor"], config["image_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert {k: video[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "size")} == {
        k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "size")
    }
    if importlib.util.find_spec("torchvision") is not None:
        processor = AutoProcessor.from_pretrained(output)
        assert isinstance(processor, Qwen2_5_VLProcessor)
        text = "<|vision_start|><|image_pad|><|vision_end|>How many?"
        ours = load_processor(str(output))
        images = random_images(1)
        assert torch.equal(
            processor(images=images, text=[text], return_tensors="pt")["input_ids"],
            ours(images=images, text=[text], return_tensors="pt")["input_ids"],
        )
    else:
        # Without torchvision (this machine) AutoProcessor reaches transformers' own video processor class,
        # which asks for torchvision: it no longer silently returns a bare tokenizer.
        with pytest.raises(ImportError, match="Qwen2VLVideoProcessor requires the Torchvision library"):
            AutoProcessor.from_pretrained(output)
    # The project's own loader reads the folder too (images only, no torchvision).
    assert load_processor(str(output)).image_processor is not None


def test_a_full_finetuning_run_exports_from_its_checkpoint(tiny_qwen, tmp_path):
    args = demo_args("grpo", tiny_qwen, tmp_path, 1, "--model.policy.finetuning", "full", *VARIED_REWARD)
    lightning_cli([*args, "--model.optimizer.init_args.lr", "1e-3"])
    run = tmp_path / "grpo" / "version_0"
    assert not (run / "checkpoints" / "adapter").exists()  # nothing to merge: the checkpoint is the source
    assert main(["export", str(run), str(tmp_path / "full")]) == 0  # the run folder: its last.ckpt
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "full")
    trained = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    base = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    assert torch.equal(exported.state_dict()[name], trained[f"policy.model.{name}"])
    assert not torch.equal(base.state_dict()[name], trained[f"policy.model.{name}"])  # it did train
    assert json.loads((tmp_path / "full" / "processor_config.json").read_text())["processor_class"] == (
        "Qwen2_5_VLProcessor"
    )


def test_export_refuses_its_input_and_a_folder_with_files(lora_run, tmp_path, capsys):
    adapter = lora_run / "checkpoints" / "adapter"
    before = sorted(path.name for path in adapter.iterdir())
    with pytest.raises(SystemExit) as raised:
        main(["export", str(adapter), str(adapter)])
    assert raised.value.code == 2
    assert f"the output {str(adapter)!r} is the export's input" in capsys.readouterr().err
    assert sorted(path.name for path in adapter.iterdir()) == before  # untouched
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["export", str(adapter), str(occupied)])
    assert "is not empty: choose an empty or new folder, or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(adapter), str(occupied), "--overwrite"]) == 0
    assert (occupied / "model.safetensors").is_file() and (occupied / "notes.txt").read_text() == "mine"

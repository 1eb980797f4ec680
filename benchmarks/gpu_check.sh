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
# Then the FSDP2 lane: full fine-tuning of the same 3B (random weights, full depth) with CPPO under
# ModelParallelStrategy on every GPU of the machine (GPUS=N to choose; 1 GPU runs FSDP2 with one shard),
# bf16 compute, sharded fp32 master weights and AdamW, the synthetic task, FSDP2_STEPS RL steps; prints the
# peak memory per GPU (max over ranks) and the step times from the run's metrics.csv, and the size of the
# sharded checkpoint. FSDP2=0 skips it; FSDP2_ONLY=1 runs only it (on a CPU: ACCELERATOR=cpu GPUS=2 with a
# small MODEL such as tiny:qwen2_5_vl-smoke).
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
if [ "${FSDP2_ONLY:-0}" != 1 ]; then
  "$PYTHON" benchmarks/real_scale.py "${args[@]}"
  echo "gpu_check: $(( $(date +%s) - started )) s wall time ($(date -u +%Y-%m-%d))"
fi

if [ "${FSDP2:-1}" = 1 ]; then
  accelerator=${ACCELERATOR:-gpu}
  gpus=${GPUS:-$(nvidia-smi -L 2> /dev/null | wc -l)}
  if [ "$gpus" -lt 1 ]; then
    echo "gpu_check FSDP2 lane: no GPU found (ACCELERATOR=cpu GPUS=2 runs it on the CPU)"
    exit 0
  fi
  precision=bf16-mixed
  if [ "$accelerator" = cpu ]; then precision=32-true; fi
  out=${FSDP2_OUT:-runs/gpu_check_fsdp2}
  rm -rf "$out"
  lane_started=$(date +%s)
  # Built (or found in the cache) before the run: a full-depth random model takes minutes to build.
  model=$("$PYTHON" -c "import sys; from cppo_lightning.models.loading import resolve_model_path as r; print(r(sys.argv[1]))" \
    "${MODEL:-random:qwen2_5_vl-3b}" | tail -1)
  "$PYTHON" cli.py fit --config configs/demo/cppo.yaml \
    --model.policy.model_name_or_path "$model" \
    --model.policy.finetuning full --model.policy.dtype float32 --model.policy.gradient_checkpointing true \
    --model.optimizer.init_args.lr 1.0e-6 \
    --trainer.accelerator "$accelerator" --trainer.devices "$gpus" --trainer.precision "$precision" \
    --trainer.strategy lightning.pytorch.strategies.ModelParallelStrategy \
    --trainer.strategy.data_parallel_size "$gpus" --trainer.strategy.tensor_parallel_size 1 \
    --trainer.max_steps "${FSDP2_STEPS:-3}" --trainer.limit_val_batches 0 --trainer.enable_progress_bar false \
    --trainer.logger.init_args.save_dir "$out" \
    --data.init_args.batch_size "${PROMPTS:-16}" --data.init_args.num_workers "${NUM_WORKERS:-2}" \
    --data.init_args.train_size $(( ${PROMPTS:-16} * gpus * ${FSDP2_STEPS:-3} )) \
    --model.rollout.samples_per_prompt "${GROUP:-5}" --model.rollout.max_new_tokens "${NEW_TOKENS:-1024}" \
    --model.update.micro_batch_rollouts 4
  "$PYTHON" benchmarks/gpu_check_report.py "$out"
  echo "gpu_check FSDP2 lane: $(( $(date +%s) - lane_started )) s wall time on $gpus device(s)"
fi

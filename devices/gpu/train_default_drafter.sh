#!/usr/bin/env bash
# Train the default Gemma 3 270M drafter (mtpkit/drafters/gemma3-270m) on one CUDA GPU (an H100 here),
# in calls of at most ~9 minutes: run the same command again and it resumes (data shards, optimizer,
# schedule and RNG all continue). The shipped drafter is OUT/best after two calls (step 1149 of 1400).
#   TARGET=/path/to/gemma-3-270m-q4_k_m.gguf OUT=runs/default bash devices/gpu/train_default_drafter.sh
set -euo pipefail
TARGET="${TARGET:-gemma3-270m}"
OUT="${OUT:-runs/gemma3-270m-default}"
BUDGET="${BUDGET:-8.6}"
python3 -m mtpkit.distill --target "$TARGET" --out "$OUT" --device cuda --resume --json --no-progress \
  --steps 1400 --batch-size 32 --num-draft-tokens 5 --num-sequences 16384 --gen-len 192 \
  --head centroid --loss kl --eval-every 200 \
  --set 'layer_types=["sliding_attention","full_attention"]' --set gen_batch=1024 --set loss_chunk=4096 \
  --set whole_prompts=false --time-budget-min "$BUDGET"

#!/usr/bin/env bash
# Stage 2 of the default Gemma 3 270M drafter (what ships in mtpkit/drafters/gemma3-270m since v2): warm start from
# the stage-1 drafter (train_default_drafter.sh), a mixed corpus of stdlib code + prose + templated instructions
# built from this machine's own files (build_corpus.py; HumanEval/MT-Bench overlaps filtered), 1700 steps.
# Resumable in calls of BUDGET minutes, like stage 1:
#   python devices/gpu/build_corpus.py mixed_corpus.jsonl
#   TARGET=/path/to/gemma-3-270m-q4_k_m.gguf INIT=stage1_drafter_dir CORPUS=mixed_corpus.jsonl OUT=runs/v2 \
#     bash devices/gpu/train_default_drafter_v2.sh
set -euo pipefail
TARGET="${TARGET:-gemma3-270m}"
OUT="${OUT:-runs/gemma3-270m-v2}"
python3 -m mtpkit.distill --target "$TARGET" --corpus "$CORPUS" --out "$OUT" --device cuda --resume --json --no-progress \
  --steps 1700 --batch-size 32 --num-draft-tokens 5 --num-sequences 24576 --gen-len 192 --lr 3e-4 \
  --head centroid --loss kl --eval-every 200 \
  --set 'layer_types=["sliding_attention","full_attention"]' --set gen_batch=1024 --set loss_chunk=4096 \
  --set warmup_steps=50 --set "init_from=$INIT" --set whole_prompts=false --time-budget-min "${BUDGET:-8.6}"

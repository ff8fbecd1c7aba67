#!/usr/bin/env bash
# Drafter v3 of the default Gemma 3 270M target: warm start from v2 (mtpkit/drafters/gemma3-270m at v2), the
# everyday corpus of build_corpus_v3.py (v2's code/prose/instructions + translation from gettext catalogs,
# summarization and QA over 1-3k-token documents, math, extraction; everyday-suite sources held out), prompts kept
# up to 3072 tokens, length-bucketed batches, KL + TV over the centroid candidates (the runtime's acceptance).
# Resumable in calls of BUDGET minutes:
#   python devices/gpu/build_corpus_v3.py corpus_v3.jsonl
#   TARGET=/path/to/gemma-3-270m-q4_k_m.gguf INIT=v2_drafter_dir CORPUS=corpus_v3.jsonl OUT=runs/v3 \
#     bash devices/gpu/train_default_drafter_v3.sh
# Environment: STEPS, NSEQ, BUDGET (minutes), LR (default 2e-4), EXTRA (more distill options, e.g. --set seed=2).
set -euo pipefail
TARGET="${TARGET:-gemma3-270m}"
OUT="${OUT:-runs/gemma3-270m-v3}"
python3 -m mtpkit.distill --target "$TARGET" --corpus "$CORPUS" --out "$OUT" --device cuda --resume --json --no-progress \
  --steps "${STEPS:-1200}" --batch-size 32 --num-draft-tokens 5 --num-sequences "${NSEQ:-20480}" --gen-len 192 \
  --lr "${LR:-2e-4}" --head centroid --loss mix --eval-every 200 \
  --set 'layer_types=["sliding_attention","full_attention"]' --set gen_batch=1024 --set loss_chunk=4096 \
  --set warmup_steps=30 --set max_prompt_len=3072 --set length_buckets=16 --set tv_weight=0.5 --set router_weight=0.3 \
  --set "init_from=$INIT" ${EXTRA:-} --time-budget-min "${BUDGET:-8.6}"

#!/usr/bin/env bash
# The MegaContext evidence run, one command that trains and evaluates (DESIGN §8, §11):
#   tokenizer -> MC training (time-boxed) -> mc_eval (NIAH/passkey, ΔNLL, loss vs distance, focus
#   policies) -> MC vs plain training throughput at the run's shapes and flags (BENCH=0 skips it).
#
#   bash scripts/mc_run.sh                    # one H100: under 10 minutes (config mc_h100)
#   NPROC=4 bash scripts/mc_run.sh            # MC training under torchrun on 4 GPUs, same global batch
#   CONFIG=mc_cpu bash scripts/mc_run.sh      # a tiny CPU version
#   TRAIN_ARGS="--mc-collapse-probes true" bash scripts/mc_run.sh   # extra base_train flags
#   EVAL_ARGS="--n 50" bash scripts/mc_run.sh                       # extra mc_eval flags
#
# Outputs: $NANOCHAT_BASE_DIR/runs/<run>/ (checkpoint, summary.json, mc_eval/); with RESULTS_DIR
# set, the small JSON results and logs are copied there too.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
CONFIG="${CONFIG:-mc_h100}"
BUDGET="${BUDGET:-}"                      # minutes of MC training (default: the config's time_budget_min)
BENCH="${BENCH:-1}"                       # 1: then MC vs plain training throughput at the run's shapes (bench_train --like-train; ~1-2 min)
NPROC="${NPROC:-1}"                       # >1: train on NPROC GPUs (torchrun); each takes 1/NPROC of the contexts
read -r -a TRAIN_ARGS <<< "${TRAIN_ARGS:-}"  # extra base_train flags, e.g. TRAIN_ARGS="--mc-collapse-probes true"
read -r -a EVAL_ARGS <<< "${EVAL_ARGS:-}"    # extra mc_eval flags, e.g. EVAL_ARGS="--n 50"
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}" PYTHONUNBUFFERED=1
RESULTS_DIR="${RESULTS_DIR:-}"
LOG="${RESULTS_DIR:-$(mktemp -d)}"   # logs stream straight into RESULTS_DIR when given
mkdir -p "$LOG"
t0=$(date +%s)
finish() {  # copy what exists, also after a failure
  [ -n "$RESULTS_DIR" ] || return 0
  local run d
  run=$(sed -n 's/^run = "\(.*\)"/\1/p' "configs/$CONFIG.toml" | head -1)
  d="$NANOCHAT_BASE_DIR/runs/$run"
  mkdir -p "$RESULTS_DIR"
  cp "$d/summary.json" "$RESULTS_DIR/train_summary.json" 2>/dev/null || true
  cp "$d/mc_eval/mc_eval.json" "$RESULTS_DIR/mc_eval.json" 2>/dev/null || true
  cp "$d"/mc_eval/*.png "$RESULTS_DIR/" 2>/dev/null || true
}
trap finish EXIT
[[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "mc_run: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
LAUNCH=("$PY") SPLIT=()
if [ "$NPROC" -gt 1 ]; then  # the config's global batch is kept: its contexts are split over the ranks
  dbs=$(sed -n 's/^device_batch_size = \([0-9]*\)/\1/p' "configs/$CONFIG.toml" | head -1)
  if [ -z "$dbs" ] || [ $(( dbs % NPROC )) -ne 0 ]; then
    echo "mc_run: NPROC=$NPROC must divide device_batch_size (${dbs:-unset}) in configs/$CONFIG.toml" >&2; exit 2
  fi
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
  SPLIT=(--device-batch-size $(( dbs / NPROC )))
fi
"$PY" -m scripts.tok_train --config "$CONFIG" 2>&1 | tee "$LOG/tok_train.log"
"${LAUNCH[@]}" -m scripts.base_train --config "$CONFIG" "${SPLIT[@]}" ${BUDGET:+--time-budget-min "$BUDGET"} "${TRAIN_ARGS[@]}" 2>&1 | tee "$LOG/base_train.log"
"$PY" -m scripts.mc_eval --config "$CONFIG" "${EVAL_ARGS[@]}" 2>&1 | tee "$LOG/mc_eval.log"
finish  # the results are kept before the bench, should it not finish
if [ "$BENCH" = 1 ]; then  # MC vs plain tokens/s at this run's shapes (same flags), same processes
  "${LAUNCH[@]}" -m scripts.bench_train --like-train "--config $CONFIG ${SPLIT[*]} ${TRAIN_ARGS[*]}" \
    --steps 10 --warmup 5 > "$LOG/bench_train_mc.json"
  cat "$LOG/bench_train_mc.json"
fi
echo "mc_run: done in $(( $(date +%s) - t0 ))s"

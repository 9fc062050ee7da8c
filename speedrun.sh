#!/usr/bin/env bash
# The main job. On an 8-GPU node: tokenizer -> base training (torchrun, all GPUs) -> val loss ->
# sampling. On a machine without GPUs: the same stages, small, on the corpus the repo ships.
#   bash speedrun.sh            # everything, set-up included
# Outputs go to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); a log to $NANOCHAT_BASE_DIR/speedrun.log.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
. .venv/bin/activate
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$NANOCHAT_BASE_DIR"
exec > >(tee -a "$NANOCHAT_BASE_DIR/speedrun.log") 2>&1

NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
  CONFIG="${CONFIG:-speedrun}"
  RUN="${RUN:-speedrun}"
  # ~8 shards for the tokenizer now, the rest of the pretraining data in the background
  python -m nanochat.dataset -n 8
  python -m nanochat.dataset -n "${NUM_SHARDS:-240}" &
  DL_PID=$!
  python -m scripts.tok_train --config "$CONFIG"
  wait $DL_PID
  torchrun --standalone --nproc_per_node="$NGPU" -m scripts.base_train --config "$CONFIG" --run "$RUN"
  torchrun --standalone --nproc_per_node="$NGPU" -m scripts.base_loss --run "$RUN"
  # MegaContext: end-to-end training (same script, --megacontext preset) on the same tokenizer and
  # data, then the memory evals (passkey/NIAH by history length, ΔNLL, focus policies)
  torchrun --standalone --nproc_per_node="$NGPU" -m scripts.base_train --config mc_h100 --run "${RUN}_mc" \
    --data fineweb --device-batch-size $(( 8 / NGPU > 0 ? 8 / NGPU : 1 )) --time-budget-min "${MC_MINUTES:-30}" \
    --num-iterations "${MC_STEPS:-20000}"
  python -m scripts.mc_eval --config mc_h100 --run "${RUN}_mc" --data fineweb
else
  export OMP_NUM_THREADS="$(nproc)"
  CONFIG="${CONFIG:-cpu}"
  RUN="${RUN:-cpu}"
  echo "no GPU found: running the small CPU version ($CONFIG preset, bundled corpus)"
  python -m scripts.tok_train --config "$CONFIG"
  # CPU_ITERS=N shortens both trainings (the test suite runs this path that way)
  python -m scripts.base_train --config "$CONFIG" --run "$RUN" ${CPU_ITERS:+--num-iterations "$CPU_ITERS"}
  python -m scripts.base_loss --run "$RUN" --data bundled
  # MegaContext, tiny: end-to-end training + the memory evals (same tokenizer: same vocab and data)
  python -m scripts.base_train --config mc_cpu --run "${RUN}_mc" ${CPU_ITERS:+--num-iterations "$CPU_ITERS"}
  python -m scripts.mc_eval --config mc_cpu --run "${RUN}_mc"
  python -m scripts.chat_cli --run "${RUN}_mc" --prompt "What is the passkey?" --max-tokens 16 --temperature 0 --raw
fi
python -m scripts.chat_cli --run "$RUN" --prompt "The meaning of memory is" --max-tokens 48 --temperature 0 --raw
echo "speedrun done: checkpoints in $NANOCHAT_BASE_DIR/runs/$RUN"

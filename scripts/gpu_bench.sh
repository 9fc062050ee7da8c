#!/usr/bin/env bash
# Every device benchmark the README reports, in one call on one H100 (each step time-boxed, one JSON
# file per benchmark, written as it finishes):
#   RESULTS_DIR=results/h100 bash scripts/gpu_bench.sh
# Scaling runs need several GPUs: torchrun --standalone --nproc_per_node=N -m scripts.bench_train --depth 20 --batch 16
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
OUT_DIR="${RESULTS_DIR:-results/bench}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
ONLY="${ONLY:-}"   # e.g. ONLY="mc decode": a subset (the whole list can outlast one 10-minute device call)
step() {  # name timeout_s command...
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return 0; fi
  echo "== $name: $*"
  timeout "$limit" "$@" > "$OUT_DIR/$name.json" 2> "$OUT_DIR/$name.err"
  echo "   rc $? ($name)"; tail -c 600 "$OUT_DIR/$name.json"; echo
}
step train_d12   120 "$PY" -m scripts.bench_train --depth 12 --batch 32 --seq 2048 --vocab 32768 --steps 10 --warmup 4
step train_d20   150 "$PY" -m scripts.bench_train --depth 20 --batch 16 --seq 2048 --vocab 65536 --steps 10 --warmup 4
step train_d20_b24 150 "$PY" -m scripts.bench_train --depth 20 --batch 24 --seq 2048 --vocab 65536 --steps 10 --warmup 4  # 32 runs out of memory on an H100
step train_mc_d8 150 "$PY" -m scripts.bench_train --like-train "--config mc_h100" --steps 10 --warmup 5   # the evidence run's shapes
step train_mc_d8_pieces 150 "$PY" -m scripts.bench_train --like-train "--config mc_h100 --mc-compile pieces" --steps 10 --warmup 5
step train_mc_d8_ctx64k 150 "$PY" -m scripts.bench_train --like-train "--config mc_h100 --mc-context-len 65536 --device-batch-size 2 --mc-random-wcs 1 --mc-probes 2" --steps 10 --warmup 5
step mc          150 "$PY" -m scripts.bench_mc
step megaattn    150 "$PY" -m scripts.bench_megaattn --W 2048,8192,16384
step decode      300 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 64
step decode_compiled 300 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 64 --decode compiled
step decode_union 300 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 256 --max-full 0 --focus union
# where an MC token's time goes (--phases), pipelined decode against unpipelined, static against compiled
step decode_phases 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases
step decode_phases_nopipe 150 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases --max-full 0 --no-pipeline
step decode_phases_compiled 320 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases --decode compiled
step decode_phases_again 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases
# the Triton decode step (decode="fused"): one step's replay, loop and kernels against static and compiled
# (with the fused logits' distance from the static step's), then the decode table with it
# (the kernels' launch configs first: NANOCHAT_DECODE_TUNING=<its JSON> makes the later steps use what it found)
step decode_kernels 300 "$PY" -m scripts.bench_decode_kernels --depth 20
step decode_step_breakdown 240 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --step-breakdown
step decode_fused 360 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases --decode fused
step decode_compiled_repeat 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 131072 --max-full 0 --steps 512 --focus union --decode compiled
step materialize 150 "$PY" -m scripts.bench_materialize --depth 20 --W 4096 --histories 131072,1048576
step decode_fused_profile 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 131072 --max-full 0 --steps 96 --focus union --decode fused --profile
# the host-bound loop: the fused table again in the same call (the full-attention baseline moved
# between machines), a profile at 4k and 1M (gpu_idle, phase_ops), the window recompute's kernels
step decode_fused_again 560 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases --decode fused --repeat 2
step decode_fused_profile_1m 270 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,1048576 --max-full 0 --steps 256 --focus union --decode fused --profile
step decode_fused_cudnn 560 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,131072,1048576 --steps 512 --focus union --phases --decode fused --repeat 2 --window-cudnn
step window_recompute 200 "$PY" -m scripts.bench_materialize --depth 20 --W 4096 --histories 131072 --reps 2 --window-modes default,cudnn
# where the loop makes the host wait (every synchronizing call by source line, --syncs), materialize's
# parts timed apart (emb_move, tree_read, emb_fresh) and the allocator's cudaMalloc counts, at 4k and 1M
step decode_syncs 300 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 4096,1048576 --max-full 0 --steps 256 --focus union --decode fused --phases --syncs
# full attention at 1M: a 100 GiB KV cache, which an H200 (141 GB) holds and an H100 does not
step decode_full_1m 450 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 1048576 --max-full 1048576 --steps 32 --focus union
step decode_compiled_profile 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 131072 --steps 96 --max-full 0 --decode compiled --profile
step decode_static_profile 200 "$PY" -m scripts.bench_decode --depth 20 --W 4096 --histories 131072 --steps 96 --max-full 0 --profile

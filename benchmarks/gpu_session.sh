#!/usr/bin/env bash
# The GPU benchmarks of the repository, each part under its own time limit so that one
# failure does not cost the others. JSON lines go to $OUT (default benchmarks/results/gpu).
# Run from the repository root on a machine with jax[cuda], torch, trl and liger-kernel. PARTS
# picks parts and their order (default: all, about 30 minutes on one H100), so that a short
# lease runs the most wanted first. BUDGET (seconds) caps the whole script: each run gets
# the smaller of its own limit and what is left, and is skipped under 20 s, so a lease's
# limit never cuts a run off unannounced:
#
#     OUT=/tmp/gpu BUDGET=560 PARTS="decode_fused decode_scanned fused_f32 decode_flags" bash benchmarks/gpu_session.sh
#
# A machine with jax[cuda] and torch but without the pure-Python dependencies and no index
# to install them from takes them as wheels fetched beforehand (Python 3.12 here):
#
#     pip download -d .whl --only-binary=:all: --no-deps --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#       --platform manylinux2014_x86_64 --platform any grain array_record portpicker \
#       ml_collections tensorboardX trl datasets dill multiprocess liger-kernel
#     # there: pip install --no-index --no-deps --target /tmp/site .whl/*.whl
#     #        && export PYTHONPATH=/tmp/site
set -u
OUT=${OUT:-benchmarks/results/gpu}
BUDGET=${BUDGET:-100000}
PARTS=${PARTS:-"decode_fused decode_scanned fused opd_step opd_step_layouts plan_qwen3 attention_blocks opd_vs_trl opd_vs_trl_scanned first_step first_step_flags rollout_ahead sampler sampler_grid decode_flags decode_compare decode_profile decode_long fused_sweep compile_depth sampler_large cli"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
log() { echo "=== $(date +%T) $*"; }
# `budget N command...`: runs the command under `timeout`, at most N seconds and at most
# what BUDGET leaves; says so and skips it when under 20 s are left.
budget() {
  local limit=$1 left=$((BUDGET - SECONDS - 5))
  shift
  ((left < limit)) && limit=$left
  if ((limit < 20)); then log "skipped (${left}s of BUDGET left): $*"; return 124; fi
  timeout "$limit" "$@"
}

part_fused() {
  part_fused_f32
  part_fused_bf16
}
part_fused_f32() {
  log "fused loss, float32, the issue's two shapes"
  budget 120 python3 benchmarks/fused_loss.py --repeats 10 --impls opdjax,opdjax_vjp,naive,liger \
    --out "$OUT/fused_loss.jsonl"
}
part_fused_bf16() {
  log "fused loss, bfloat16, a Qwen3-1.7B head (H=2048, V=151,936)"
  budget 80 python3 benchmarks/fused_loss.py --repeats 10 --dtype bfloat16 --shapes 8192,2048,151936 \
    --impls opdjax,opdjax_vjp,naive,liger --out "$OUT/fused_loss.jsonl"
}
part_fused_sweep() {
  log "fused loss, bfloat16, Qwen3-1.7B head: tokens per chunk (0 = auto) against Liger"
  budget 150 python3 benchmarks/fused_loss.py --repeats 10 --dtype bfloat16 --shapes 8192,2048,151936 \
    --impls opdjax_vjp,liger --chunk_sizes 0,512,1024,2048,4096 --out "$OUT/fused_loss_sweep.jsonl"
}
part_opd_step() {
  log "one OPD step, Qwen3-0.6B shape, B=1 T=512, sampling included"
  budget 150 python3 benchmarks/opd_step_scale.py --sample --repeats 3 --out "$OUT/opd_step_scale.jsonl"
}
part_opd_step_layouts() {
  log "one OPD step, Qwen3-0.6B shape: scanned with save_dots (the default from 16 layers) against per-layer"
  budget 150 python3 benchmarks/opd_step_scale.py --sample --repeats 3 --scan_layers \
    --out "$OUT/opd_step_scale.jsonl"
  budget 150 python3 benchmarks/opd_step_scale.py --sample --repeats 3 --scan_layers --remat none \
    --out "$OUT/opd_step_scale.jsonl"
}
part_plan_qwen3() {
  log "the qwen3_opd step's memory plan on this device (8 rows, cuDNN attention), from shapes"
  budget 120 python3 benchmarks/data_parallel.py --devices 1 --out "$OUT/data_parallel.jsonl"
}
part_attention_blocks() {
  log "XLA's attention in blocks of 512 queries and in causal groups against one block (float32: cuDNN takes bfloat16)"
  budget 150 python3 benchmarks/attention_blocks.py --tokens 2048 4096 8192 --dtypes float32 \
    --out "$OUT/attention_blocks.jsonl"
}
part_opd_vs_trl() {
  log "one on-policy JSD(0.5) step against TRL's GKDTrainer (needs trl), float32, small shapes"
  budget 170 python3 benchmarks/opd_step.py --steps 8 --out "$OUT/opd_step.jsonl"
}
part_opd_vs_trl_scanned() {
  log "the same opdjax step with scanned layers, cold and with a warm compilation cache"
  budget 110 python3 benchmarks/opd_step.py --steps 8 --tools opdjax opdjax_cached \
    --scan_layers --out "$OUT/opd_step.jsonl"
}
part_rollout_ahead() {
  log "trainer steps/s with and without train.rollout_ahead (opd sampled, grpo), small models"
  budget 140 python3 benchmarks/rollout_ahead.py --steps 100 --out "$OUT/rollout_ahead.jsonl"
}
part_first_step() {
  log "the first step with the update compiled beside the rollout or in line, cold"
  budget 80 python3 benchmarks/opd_step.py --steps 4 --tools opdjax --serial_compile \
    --out "$OUT/opd_step.jsonl"
  budget 80 python3 benchmarks/opd_step.py --steps 4 --tools opdjax --out "$OUT/opd_step.jsonl"
  budget 120 python3 benchmarks/first_step.py --repeats 1 --recipes opd_sampled \
    --out "$OUT/first_step.jsonl"
}
part_first_step_flags() {
  log "the first step cold without XLA's GEMM autotuning, unrolled and scanned (is autotuning the compile?)"
  for extra in "" "--scan_layers"; do
    XLA_FLAGS=--xla_gpu_autotune_level=0 budget 80 python3 benchmarks/opd_step.py --steps 6 \
      --tools opdjax $extra --out "$OUT/opd_step.jsonl"
  done
}
part_compile_depth() {
  log "compile time and program size against depth, per-layer vs scanned"
  budget 90 python3 benchmarks/compile_depth.py --out "$OUT/compile_depth.jsonl"
}
part_sampler() {
  log "sampler, Qwen3-0.6B shape, bfloat16, against transformers"
  XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 130 python3 benchmarks/sampler.py --models qwen3-0.6b \
    --dtype bfloat16 --batches 1 64 --new_tokens 128 --repeats 2 --out "$OUT/sampler.jsonl"
}
part_sampler_grid() {
  log "sampler, tiny and small models, float32, batches 1-256, 64 and 512 new tokens, against transformers"
  for run in "tiny 64 2 80" "small 64 2 80" "tiny 512 1 100" "small 512 1 140"; do
    read -r model n repeats limit <<<"$run"
    XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget $limit python3 benchmarks/sampler.py --models $model \
      --batches 1 8 64 256 --new_tokens $n --repeats $repeats --out "$OUT/sampler_grid.jsonl"
  done
}
part_decode_flags() {
  log "decode, Qwen3-0.6B shape, bfloat16, batch 1: XLA's Triton GEMMs on or off (cuBLAS) for its matrix-vector products"
  for flags in "" "--xla_gpu_enable_triton_gemm=false"; do
    XLA_FLAGS="$flags" XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 45 python3 benchmarks/sampler.py \
      --models qwen3-0.6b --dtype bfloat16 --batches 1 --new_tokens 128 --repeats 3 \
      --no_transformers --out "$OUT/decode_flags.jsonl"
  done
}
part_decode_compare() {
  log "decode, Qwen3-0.6B shape, bfloat16: default, windows forced (a lax.switch per layer), one window, scanned"
  for run in "1 " "1 --windowed_decode_min_mb=0" "1 --max_decode_windows=1" "1 --scan_layers" \
    "64 " "64 --windowed_decode_min_mb=0"; do
    read -r batch extra <<<"$run"
    XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 60 python3 benchmarks/sampler.py --models qwen3-0.6b \
      --dtype bfloat16 --batches $batch --new_tokens 128 --repeats 3 --no_transformers $extra \
      --out "$OUT/decode_compare.jsonl"
  done
}
part_decode_profile() {
  log "decode, Qwen3-0.6B shape, bfloat16: kernels per step and the GPU's busy fraction (profiler)"
  for run in "1 on" "1 off" "64 on"; do  # XLA's command buffers hide their kernels from the trace
    read -r batch fuse <<<"$run"
    XLA_FLAGS=--xla_gpu_enable_command_buffer= XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 60 python3 \
      benchmarks/decode_profile.py --models qwen3-0.6b --dtype bfloat16 --batch $batch \
      --fuse_projections $fuse --top 30 --out "$OUT/decode_profile.jsonl"
  done
}
part_decode_fused() {
  log "decode, Qwen3-0.6B shape, bfloat16: merged projections or not, XLA or Pallas attention; the plain-JAX model of each"
  for run in "1 on xla" "1 off xla" "1 on pallas" "64 on xla" "64 off xla" "64 on pallas"; do
    read -r batch fuse kernel <<<"$run"
    XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 45 python3 benchmarks/sampler.py --models qwen3-0.6b \
      --dtype bfloat16 --batches $batch --new_tokens 128 --repeats 3 --no_transformers \
      --fuse_projections $fuse --decode_kernel $kernel --out "$OUT/decode_fused.jsonl"
  done
  budget 100 python3 benchmarks/decode_fusion.py --batch 1 --dtype bfloat16 --repeats 3 \
    --out "$OUT/decode_fusion.jsonl"
  budget 60 python3 benchmarks/decode_fusion.py --batch 64 --dtype bfloat16 --repeats 3 \
    --projections merged --attention einsum pallas --out "$OUT/decode_fusion.jsonl"
}
part_decode_scanned() {
  log "decode, Qwen3-0.6B shape, bfloat16, scanned layers: the layer scan or unrolled (sampling.UNROLL_LAYERS, on for a CPU)"
  for run in "1 off" "1 on" "64 off" "64 on"; do
    read -r batch unroll <<<"$run"
    XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 60 python3 benchmarks/sampler.py --models qwen3-0.6b \
      --dtype bfloat16 --batches $batch --new_tokens 128 --repeats 3 --no_transformers \
      --scan_layers --unroll_layers $unroll --out "$OUT/decode_scanned.jsonl"
  done
}
part_decode_long() {
  log "decode, Qwen3-0.6B shape, bfloat16, batch 64, 1,024 new tokens (a 272 MB layer cache): windows or not"
  for run in "150 --windowed_decode_min_mb=0" "90 "; do  # 8 windows: 8 attention branches per layer to compile
    read -r limit extra <<<"$run"
    XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget $limit python3 benchmarks/sampler.py --models qwen3-0.6b \
      --dtype bfloat16 --batches 64 --new_tokens 1024 --repeats 2 --no_transformers $extra \
      --out "$OUT/decode_compare.jsonl"
  done
}
part_sampler_large() {
  log "sampler, Qwen3-0.6B shape, bfloat16, batches 8 and 256, 512 new tokens, against transformers"
  XLA_PYTHON_CLIENT_MEM_FRACTION=.45 budget 200 python3 benchmarks/sampler.py --models qwen3-0.6b \
    --dtype bfloat16 --batches 8 256 --new_tokens 512 --repeats 1 --out "$OUT/sampler_large.jsonl"
}
part_cli() {
  log "the CLI on one GPU: quickstart shortened, bfloat16 compute, async checkpoints (auto)"
  args=()
  for stage in teacher warmstart opd; do
    args+=(--exp.stages.$stage.student.dtype=bfloat16 --exp.stages.$stage.teacher.dtype=bfloat16
           --exp.stages.$stage.teacher.param_dtype=bfloat16 --exp.stages.$stage.train.steps=40
           --exp.stages.$stage.train.save_every=20 --exp.stages.$stage.eval.every=40)
  done
  budget 100 python3 -m opdjax.train --exp quickstart --workdir /tmp/qs_gpu "${args[@]}" 2>&1 \
    | grep -v "it/s\]$" | tail -25
  ls /tmp/qs_gpu/opd/checkpoints
}

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers
import opdjax.trainer  # fails here, in seconds, if a dependency is missing
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', transformers.__version__)" || exit 1

for part in $PARTS; do
  if declare -F "part_$part" >/dev/null; then "part_$part"; else log "unknown part: $part"; fi
done
log done

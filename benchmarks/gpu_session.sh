#!/usr/bin/env bash
# Every GPU benchmark of the repository in one pass (about 9 minutes on one H100), each part
# under its own time limit so that one failure does not cost the others. JSON lines go to
# $OUT (default benchmarks/results/gpu). Run from the repository root on a machine with
# jax[cuda], torch and liger-kernel:
#
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
log() { echo "=== $(date +%T) $*"; }

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', transformers.__version__)"

log "fused loss, float32, the issue's two shapes"
timeout 120 python3 benchmarks/fused_loss.py --repeats 10 --impls opdjax,opdjax_vjp,naive,liger \
  --out "$OUT/fused_loss.jsonl"
log "fused loss, bfloat16, a Qwen3-1.7B head (H=2048, V=151,936)"
timeout 80 python3 benchmarks/fused_loss.py --repeats 10 --dtype bfloat16 --shapes 8192,2048,151936 \
  --impls opdjax,opdjax_vjp,naive,liger --out "$OUT/fused_loss.jsonl"

log "one OPD step, Qwen3-0.6B shape, B=1 T=512, sampling included"
timeout 150 python3 benchmarks/opd_step_scale.py --sample --repeats 3 --out "$OUT/opd_step_scale.jsonl"

log "sampler, Qwen3-0.6B shape, bfloat16, against transformers"
XLA_PYTHON_CLIENT_MEM_FRACTION=.45 timeout 130 python3 benchmarks/sampler.py --models qwen3-0.6b \
  --dtype bfloat16 --batches 1 64 --new_tokens 128 --repeats 2 --out "$OUT/sampler.jsonl"

log "the CLI on the GPU: quickstart shortened, bfloat16 compute (default dtypes)"
args=()
for stage in teacher warmstart opd; do
  args+=(--exp.stages.$stage.student.dtype=bfloat16 --exp.stages.$stage.teacher.dtype=bfloat16
         --exp.stages.$stage.teacher.param_dtype=bfloat16 --exp.stages.$stage.train.steps=40
         --exp.stages.$stage.train.save_every=40 --exp.stages.$stage.eval.every=40)
done
timeout 90 python3 -m opdjax.train --exp quickstart --workdir /tmp/qs_gpu "${args[@]}" 2>&1 \
  | grep -v "it/s\]$" | tail -25
log done

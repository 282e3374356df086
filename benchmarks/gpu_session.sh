#!/usr/bin/env bash
# The GPU benchmarks of the repository, each part under its own time limit so that one
# failure does not cost the others. JSON lines go to $OUT (default benchmarks/results/gpu).
# Run from the repository root on a machine with jax[cuda], torch, trl and liger-kernel; PARTS
# picks parts (default: all, about 9 minutes on one H100 each for the two groups):
#
#     OUT=/tmp/gpu PARTS="fused_sweep compile_depth sampler_large cli" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
PARTS=${PARTS:-"fused opd_step opd_vs_trl rollout_ahead sampler fused_sweep compile_depth sampler_large cli"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-}:$PWD
log() { echo "=== $(date +%T) $*"; }
want() { [[ " $PARTS " == *" $1 "* ]]; }

log environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax, orbax.checkpoint as o, torch, transformers
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__,
      'torch', torch.__version__, 'transformers', transformers.__version__)"

if want fused; then
  log "fused loss, float32, the issue's two shapes"
  timeout 120 python3 benchmarks/fused_loss.py --repeats 10 --impls opdjax,opdjax_vjp,naive,liger \
    --out "$OUT/fused_loss.jsonl"
  log "fused loss, bfloat16, a Qwen3-1.7B head (H=2048, V=151,936)"
  timeout 80 python3 benchmarks/fused_loss.py --repeats 10 --dtype bfloat16 --shapes 8192,2048,151936 \
    --impls opdjax,opdjax_vjp,naive,liger --out "$OUT/fused_loss.jsonl"
fi

if want fused_sweep; then
  log "fused loss, bfloat16, Qwen3-1.7B head: tokens per chunk (0 = auto) against Liger"
  timeout 150 python3 benchmarks/fused_loss.py --repeats 10 --dtype bfloat16 --shapes 8192,2048,151936 \
    --impls opdjax_vjp,liger --chunk_sizes 0,512,1024,2048,4096 --out "$OUT/fused_loss_sweep.jsonl"
fi

if want opd_step; then
  log "one OPD step, Qwen3-0.6B shape, B=1 T=512, sampling included"
  timeout 150 python3 benchmarks/opd_step_scale.py --sample --repeats 3 --out "$OUT/opd_step_scale.jsonl"
fi

if want opd_vs_trl; then
  log "one on-policy JSD(0.5) step against TRL's GKDTrainer (needs trl), float32, small shapes"
  timeout 200 python3 benchmarks/opd_step.py --steps 8 --out "$OUT/opd_step.jsonl"
  timeout 120 python3 benchmarks/opd_step.py --steps 8 --tools opdjax opdjax_cached \
    --scan_layers --out "$OUT/opd_step.jsonl"
fi

if want rollout_ahead; then
  log "trainer steps/s with and without train.rollout_ahead (opd sampled, grpo), small models"
  timeout 240 python3 benchmarks/rollout_ahead.py --steps 120 --out "$OUT/rollout_ahead.jsonl"
fi

if want compile_depth; then
  log "compile time and program size against depth, per-layer vs scanned"
  timeout 90 python3 benchmarks/compile_depth.py --out "$OUT/compile_depth.jsonl"
fi

if want sampler; then
  log "sampler, Qwen3-0.6B shape, bfloat16, against transformers"
  XLA_PYTHON_CLIENT_MEM_FRACTION=.45 timeout 130 python3 benchmarks/sampler.py --models qwen3-0.6b \
    --dtype bfloat16 --batches 1 64 --new_tokens 128 --repeats 2 --out "$OUT/sampler.jsonl"
fi

if want sampler_large; then
  log "sampler, Qwen3-0.6B shape, bfloat16, batches 8 and 256, 512 new tokens, against transformers"
  XLA_PYTHON_CLIENT_MEM_FRACTION=.45 timeout 200 python3 benchmarks/sampler.py --models qwen3-0.6b \
    --dtype bfloat16 --batches 8 256 --new_tokens 512 --repeats 1 --out "$OUT/sampler_large.jsonl"
fi

if want cli; then
  log "the CLI on one GPU: quickstart shortened, bfloat16 compute, async checkpoints (auto)"
  args=()
  for stage in teacher warmstart opd; do
    args+=(--exp.stages.$stage.student.dtype=bfloat16 --exp.stages.$stage.teacher.dtype=bfloat16
           --exp.stages.$stage.teacher.param_dtype=bfloat16 --exp.stages.$stage.train.steps=40
           --exp.stages.$stage.train.save_every=20 --exp.stages.$stage.eval.every=40)
  done
  timeout 100 python3 -m opdjax.train --exp quickstart --workdir /tmp/qs_gpu "${args[@]}" 2>&1 \
    | grep -v "it/s\]$" | tail -25
  ls /tmp/qs_gpu/opd/checkpoints
fi
log done

#!/bin/bash
# One GPU session's side-by-side check: this project's EDM benchmark (JAX) against the upstream NVlabs/edm
# PyTorch peer, both on one CUDA device, alternating (pair.py), at full size and tiny size, plus the DDO
# step's FLOPs (XLA cost analysis) as MFU and both sides' peak device memory; then, time allowing, the JAX
# sampler's images/s over a few batch sizes.
#
# Run from the repository root. Needs:
#   UPSTREAM_EDM     the NVlabs/edm tree at 008a4e5316c8e3bfe61a62f874bddba254295afb (default .upstream_edm)
#   $UPSTREAM_EDM/bench/{pair.py,peer_edm_torch.py}   copies of ../shared/bench/ (they must travel with it)
#   $UPSTREAM_EDM/wheels/ml_collections-*.whl          installed to /tmp/site if ml_collections is missing
# Writes to $OUT (default /tmp/gpu_pair_out): log.txt (environment, pair.py output), jax.jsonl and
# torch.jsonl (every run's JSON line), summary.json, sweep.jsonl.
#
# Settings (environment): SIZES ("full tiny"), FULL_B (64), FULL_STEPS (10), FULL_SB (128), TINY_B (64),
# TINY_STEPS (10), TINY_SB (256), PAIRS_FULL (2), PAIRS_TINY (2), FULL_TIMEOUT (270 s), TINY_TIMEOUT
# (120 s), SWEEP (full-size sampler batches, "256,1024"; "" = none), SWEEP_SIZE (full), SWEEP_UNTIL (330:
# the sweep runs only if fewer seconds than this have passed, and ends by DEADLINE), DEADLINE (450 s),
# PEAK_TFLOPS (67: the H200 SXM's dense FP32 rate without tensor cores, by the datasheet; TF32 tensor-core
# dense is ~495, bf16 ~990), PYTHON (python3), CUDA (1; 0 = CPU dry run with the CPU peer).
# CPU dry run: CUDA=0 PYTHON=python SIZES=tiny TINY_B=4 TINY_STEPS=2 TINY_SB=4 PAIRS_TINY=1 SWEEP=2,4 \
#              SWEEP_SIZE=tiny benchmarks/gpu_pair.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_pair_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export UPSTREAM_EDM=${UPSTREAM_EDM:-$PWD/.upstream_edm}
export PEER_EDM_TORCH=${PEER_EDM_TORCH:-$UPSTREAM_EDM/bench/peer_edm_torch.py}
PAIR=${PAIR_PY:-$UPSTREAM_EDM/bench/pair.py}
PY=${PYTHON:-python3}
CUDA=${CUDA:-1}
PEAK=${PEAK_TFLOPS:-67}
FULL_B=${FULL_B:-64}; FULL_STEPS=${FULL_STEPS:-10}; FULL_SB=${FULL_SB:-128}
TINY_B=${TINY_B:-64}; TINY_STEPS=${TINY_STEPS:-10}; TINY_SB=${TINY_SB:-256}
PAIRS_FULL=${PAIRS_FULL:-2}; PAIRS_TINY=${PAIRS_TINY:-2}
FULL_TIMEOUT=${FULL_TIMEOUT:-270}; TINY_TIMEOUT=${TINY_TIMEOUT:-120}
SIZES=${SIZES:-full tiny}
SWEEP=${SWEEP-256,1024}; SWEEP_SIZE=${SWEEP_SIZE:-full}; SWEEP_UNTIL=${SWEEP_UNTIL:-330}
DEADLINE=${DEADLINE:-450}
CACHE=${JAX_CACHE:-/tmp/ddo_jax_gpu_cache}
SECONDS=0

if ! $PY -c "import ml_collections" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$UPSTREAM_EDM"/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null
  $PY -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
  echo "peak TFLOP/s used for MFU: $PEAK"
} 2>&1 | tee "$LOG"

if [ "$CUDA" = 1 ]; then
  TORCHB="$PY benchmarks/peer_edm_torch_gpu.py"
else   # CPU dry run: the CPU peer
  TORCHB="$PY $PEER_EDM_TORCH"
fi
JAXB="$PY benchmarks/edm_cifar10.py --compile_cache $CACHE --peak_tflops $PEAK"
FIELDS="--field step_median --field sampler_median --field real_images_per_s --field sampler_images_per_s"
FIELDS="$FIELDS --field device_peak_mib --field step_device_peak_mib --field peak_rss_mib"

for size in $SIZES; do
  if [ "$size" = full ]; then B=$FULL_B; S=$FULL_STEPS; SB=$FULL_SB; P=$PAIRS_FULL; T=$FULL_TIMEOUT
  else B=$TINY_B; S=$TINY_STEPS; SB=$TINY_SB; P=$PAIRS_TINY; T=$TINY_TIMEOUT; fi
  args="--size $size --batch $B --steps $S --sampler_batch $SB"
  echo "== [$SECONDS s] $size: $args, $P pairs, timeout $T s" | tee -a "$LOG"
  timeout "$T" $PY "$PAIR" --pairs "$P" $FIELDS \
      --a "$JAXB $args 2>>$LOG | tee -a $OUT/jax.jsonl" \
      --b "$TORCHB $args 2>>$LOG | tee -a $OUT/torch.jsonl" 2>&1 | tee -a "$LOG"
done

if [ -n "$SWEEP" ] && [ "$SECONDS" -lt "$SWEEP_UNTIL" ]; then
  echo "== [$SECONDS s] sampler sweep ($SWEEP_SIZE): $SWEEP" | tee -a "$LOG"
  timeout $((DEADLINE - SECONDS)) $JAXB --size "$SWEEP_SIZE" --skip_step --sampler_batch "${SWEEP%%,*}" \
      --sampler_batches "$SWEEP" > "$OUT/sweep.jsonl" 2>> "$LOG"
fi
echo "== [$SECONDS s] done" | tee -a "$LOG"

$PY - "$OUT" "$PEAK" <<'EOF' | tee "$OUT/summary.json"
import json, pathlib, statistics, sys
out, peak = pathlib.Path(sys.argv[1]), float(sys.argv[2])
def rows(name):
  p = out / name
  return [json.loads(l) for l in p.read_text().splitlines() if l.startswith("{")] if p.exists() else []
summary = {}
for size in ("full", "tiny"):
  j = [r for r in rows("jax.jsonl") if r.get("size") == size]
  t = [r for r in rows("torch.jsonl") if r.get("size") == size]
  if not j or not t:
    continue
  def med(rs, k):
    v = [r[k] for r in rs if isinstance(r.get(k), (int, float))]
    return statistics.median(v) if v else float("nan")
  flops = j[0].get("step_flops", 0.0)
  s = dict(device=j[0].get("device"), batch=j[0].get("batch"), sampler_batch=j[0].get("sampler_batch"),
           pairs=min(len(j), len(t)), step_flops=flops)
  for k in ("step_median", "sampler_median", "device_peak_mib", "step_device_peak_mib", "peak_rss_mib"):
    s[k] = dict(jax=med(j, k), torch=med(t, k), ratio_jax_over_torch=med(j, k) / med(t, k))
  s["step_tflops_per_s"] = dict(jax=flops / med(j, "step_median") / 1e12, torch=flops / med(t, "step_median") / 1e12)
  s["step_mfu"] = {k: v / peak for k, v in s["step_tflops_per_s"].items()}
  s["sampler_mfu_jax"] = med(j, "sampler_mfu")
  s["jax_compile_s"] = [r.get("compile_s") for r in j]
  s["jax_compile_cache"] = [r.get("compile_cache_result") for r in j]
  s["jax_sampler_compile_s"] = [r.get("sampler_compile_s") for r in j]
  summary[size] = s
sw = rows("sweep.jsonl")
if sw:
  summary["sampler_sweep"] = sw[0].get("sampler_sweep")
summary["peak_tflops_for_mfu"] = peak
print(json.dumps(summary, indent=1))
EOF

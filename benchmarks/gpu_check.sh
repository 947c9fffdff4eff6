#!/usr/bin/env bash
# One prepared GPU check for the fused Triton kernel: kernel tests on CUDA (bf16 included),
# the whole kernel benchmark and the DIF-SASRec training step, in under 8 minutes on an H100/H200.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/{env.txt, tests.log, tests-*.log, bench.log, kernels.{json,csv,png}, fp32/, step.log, step/}.
# Each stage has its own time limit, so a slow or failing stage does not eat the others' time.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: the script moves to the repository root
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}  # GPU images may have python3 alone
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dif_attention, installed or not
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. correctness on the GPU: values and gradients vs the oracle, every fusion, fp32/fp16/bf16. Most of the
#    time is Triton compiling each kernel configuration once, so six test groups run side by side
#    (the on-disk Triton cache is shared safely); pytest-xdist is not assumed.
GROUPS=("fusion" "odd_lengths" "dtypes or general or broadcast" "nan or dropout"
        "module or compile or autocast or opcheck" "energies or unsupported or bad or environment or one_dtype")
PIDS=()
for i in "${!GROUPS[@]}"; do
  timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernel.py -k "${GROUPS[$i]}" \
    > "$OUT/tests-$i.log" 2>&1 &
  PIDS+=($!)
done
for p in "${PIDS[@]}"; do wait "$p"; done
for i in "${!GROUPS[@]}"; do echo "tests group $i (${GROUPS[$i]}): $(tail -1 "$OUT/tests-$i.log")"; done | tee "$OUT/tests.log"

# 2. the op table: eager / SDPA-concat / Flex / Triton, add and paper gate, 4 shapes, fwd and fwd+bwd,
#    bf16 then fp32 (fp32 with fewer repeats)
timeout 200 "$PY" benchmarks/kernels.py --dtypes bf16 --out "$OUT" --repeats 20 2>&1 | tee "$OUT/bench.log"
timeout 60 "$PY" benchmarks/kernels.py --dtypes fp32 --providers eager sdpa triton --out "$OUT/fp32" \
  --repeats 10 2>&1 | tee "$OUT/bench-fp32.log"

# 3. a whole DIF-SASRec training step at the paper's Beauty size (b=2048, n=50, 4 layers, paper gate,
#    attention dropout 0.3): eager fp32 vs sdpa vs triton (fp32, bf16 autocast)
timeout 60 "$PY" benchmarks/kernels.py --no-kernels --step --repeats 5 --out "$OUT/step" 2>&1 | tee "$OUT/step.log"
echo "gpu_check done: $(date -u)"

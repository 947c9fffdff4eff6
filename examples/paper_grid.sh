#!/usr/bin/env bash
# The paper-scale grid on one GPU in one go: Amazon Beauty (SASRec, SASRecF, DIF-SASRec; seeds 0, 1, 2) and Amazon
# Sports (SASRec, DIF-SASRec; seed 0) with the settings of the CPU tables in docs/results.md (lr 3e-4, 100 warm-up
# steps, batches of 256 windows, every position trained, bf16 autocast), every run side by side on the one GPU
# under one training-time budget, then one table per dataset.
#
#   bash examples/paper_grid.sh OUT_DIR
#
# Settings from the environment [defaults]:
#   BUDGET  training seconds per run [360]: a run stops at the first epoch end past it and is tested at its
#           best-validation checkpoint; the table's epochs column shows how far it got and where it peaked
#   LIMIT   wall-clock seconds per run, start-up and test included [540]; a run past it is killed (no row)
#   JOBS    runs at once [11, the whole grid]    SEEDS  Beauty's seeds [0,1,2]    DEVICE  [cuda]
#   DATA    folder holding Beauty.txt, Sports_and_Outdoors.txt and their *_item2attributes.json
#           [the library's default, ../shared/data/amazon]
#   EXTRA   flags appended to every run (they win); e.g. a quick check of this script on a CPU:
#           DEVICE=cpu SEEDS=0 EXTRA="--dim 16 --ff-dim 16 --attr-dim 8 --layers 1 --heads 2 --epochs 1" \
#             bash examples/paper_grid.sh /tmp/grid
#
# Writes OUT_DIR/{env.txt, grid.log, logs/, runs/, beauty-paper-gpu.{md,json}, sports-paper-gpu.{md,json}}; exits 1
# when a run failed or was killed at LIMIT (grid.log names it; its log is under logs/). Runs resume: after a kill,
# the same command continues each run from its last checkpoint.
set -u
OUT=${1:?usage: bash examples/paper_grid.sh OUT_DIR}
BUDGET=${BUDGET:-360}
LIMIT=${LIMIT:-540}
JOBS=${JOBS:-11}
SEEDS=${SEEDS:-0,1,2}
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)  # absolute: the script moves to the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-$(command -v python || command -v python3)}  # GPU images may have python3 alone
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's dif_attention, installed or not
DATA_FLAG=()
if [ -n "${DATA:-}" ]; then
  [ -d "$DATA" ] || { echo "paper_grid.sh: DATA=$DATA: no such folder" >&2; exit 2; }
  DATA_FLAG=(--data "$(cd "$DATA" && pwd)")
fi
TAG=gpu-lr0.0003

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'GPUs', torch.cuda.device_count())"
  echo "BUDGET=$BUDGET LIMIT=$LIMIT JOBS=$JOBS SEEDS=$SEEDS DEVICE=$DEVICE EXTRA=$EXTRA"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
: > "$OUT/grid.log"

run_one() {  # dataset model seed
  local name="$1-$2-seed$3" epochs=200
  [ "$1" = sports ] && epochs=16  # the Sports CPU runs' cap
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  timeout "$LIMIT" "$PY" examples/sasrec.py --dataset "$1" "${DATA_FLAG[@]}" --paper --train-mode all \
    --batch-size 256 --warmup 100 --lr 0.0003 --epochs "$epochs" --precision bf16 --device "$DEVICE" \
    --max-train-seconds "$BUDGET" --models "$2" --seeds "$3" --threads 1 --progress false --resume true \
    --out-dir "$OUT/runs" --tag "$TAG" --results "$OUT/logs/$name" $EXTRA > "$OUT/logs/$name.log" 2>&1
  echo "$name: exit $? after $SECONDS s; $(tail -n 1 "$OUT/logs/$name.log")" | tee -a "$OUT/grid.log"
}

GRID=()
for m in SASRec SASRecF DIFSASRec; do
  for s in ${SEEDS//,/ }; do GRID+=("beauty $m $s"); done
done
GRID+=("sports SASRec 0" "sports DIFSASRec 0")
SECONDS=0
for job in "${GRID[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  # shellcheck disable=SC2086  # job is "dataset model seed"
  run_one $job &
done
wait

"$PY" examples/report.py "$OUT/runs/beauty" --models "SASRec-$TAG,SASRecF-$TAG,DIFSASRec-$TAG" \
  --results "$OUT/beauty-paper-gpu" 2>&1 | tee -a "$OUT/grid.log"
"$PY" examples/report.py "$OUT/runs/sports" --models "SASRec-$TAG,DIFSASRec-$TAG" \
  --results "$OUT/sports-paper-gpu" 2>&1 | tee -a "$OUT/grid.log"
echo "paper_grid done in $SECONDS s: $(date -u)" | tee -a "$OUT/grid.log"
! grep -q ": exit [1-9]" "$OUT/grid.log"  # the exit status: 1 when a run failed or was killed at LIMIT

#!/bin/bash
# The direct/stts pairs behind bench_accuracy.py's per-S table (benchmarks/README.md): U-Net f16, one
# torch thread, the seeded split of each dataset, --epochs 300 capped by a time limit, one run at a time.
#   bash benchmarks/train_accuracy_pairs.sh [SHARED_DATA_DIR]      # about 70 min on 2 CPU cores
set -u
DATA=${1:-../shared/data}
N=$DATA/dsb2018-nuclei
K=$DATA/kvasir-seg
t() {
  local name=$1; shift
  echo "=== $name start $(date +%T)"
  rm -rf "runs/acc/$name"
  segcli train "$@" -o "runs/acc/$name" --arch unet --features 16 --epochs 300 --threads 1 -q 2> "runs/acc/$name.log"
  echo "=== $name end $(date +%T) rc=$?"
}
mkdir -p runs/acc
t nuc-direct-32  --method direct --data "$N" --channels rgb --size 32  --time-limit 2m
t nuc-stts-32    --method stts   --data "$N" --channels rgb --size 32  --time-limit 4m
t nuc-direct-64  --method direct --data "$N" --channels rgb --size 64  --time-limit 3m
t nuc-stts-64    --method stts   --data "$N" --channels rgb --size 64  --time-limit 6m
t nuc-direct-128 --method direct --data "$N" --channels rgb --size 128 --time-limit 5m
t kva-direct-32  --method direct --data "$K" --size 32  --time-limit 3m
t kva-stts-32    --method stts   --data "$K" --size 32  --time-limit 6m
t nuc-direct-256 --method direct --data "$N" --channels rgb --size 256 --time-limit 6m
t nuc-stts-256   --method stts   --data "$N" --channels rgb --size 256 --time-limit 10m
t kva-direct-128 --method direct --data "$K" --size 128 --time-limit 6m
t kva-stts-128   --method stts   --data "$K" --size 128 --time-limit 10m
t kva-direct-256 --method direct --data "$K" --size 256 --time-limit 6m
t kva-stts-256   --method stts   --data "$K" --size 256 --time-limit 10m

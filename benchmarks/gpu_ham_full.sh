#!/bin/bash
# The ham_full comparison (configs/fashion_mnist_{pgdat,ham}.py, seeds 0-2) on one GPU, then its
# tables: the six runs train at once (the GPU is far from busy with one small CNN), each then
# attacked with PGD-20 and AutoAttack on 1,000 class-stratified test images of its last
# checkpoint. Per-run timings are shared six ways here: measure wall time with runs alone
# (python launch.py ... one at a time) or with benchmarks/ham_cost.py.
#
#   HAMJAX_DATA_DIR=/path/with/fashion-mnist bash benchmarks/gpu_ham_full.sh [ROOT]
#
# Workdirs go under ROOT (default runs/gpu) in the layout of benchmarks/fashion_mnist_compare.py,
# which then writes benchmarks/results/fashion_mnist_ham_full_<TAG>.{json,md} (TAG default gpu).
set -euo pipefail
ROOT=${1:-runs/gpu}
TAG=${TAG:-gpu}
EXAMPLES=${EXAMPLES:-1000}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.12}  # six processes
workdir() { if [ "$2" = 0 ]; then echo "$ROOT/ham_full/$1"; else echo "$ROOT/ham_full/seed$2/$1"; fi; }
declare -A CONFIG=([pgd_at]=configs/fashion_mnist_pgdat.py [ham]=configs/fashion_mnist_ham.py)
for seed in 0 1 2; do for run in pgd_at ham; do
  w=$(workdir $run $seed); mkdir -p "$w"
  python launch.py --config="${CONFIG[$run]}" --workdir="$w" --config.seed=$seed \
    --cpu_devices=1 >>"$w/stdout.log" 2>&1 &
done; done; wait
for seed in 0 1 2; do for run in pgd_at ham; do
  w=$(workdir $run $seed)
  python -m hamjax.evaluate --workdir="$w" --attacks=pgd20,autoattack \
    --num_examples="$EXAMPLES" --checkpoint=last --cpu_devices=1 >>"$w/stdout.log" 2>&1 &
done; done; wait
python benchmarks/fashion_mnist_compare.py --suite=ham_full --seeds 0 1 2 --report_only \
  --root="$ROOT" --tag="$TAG" --autoattack_checkpoints last \
  --trained_elsewhere="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), JAX $(python -c 'import jax; print(jax.__version__)'): the six runs at once by benchmarks/gpu_ham_full.sh, then PGD-20 and AutoAttack on $EXAMPLES test images each"

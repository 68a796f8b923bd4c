#!/bin/bash
# The evidence suites of benchmarks/fashion_mnist_compare.py on one GPU, with AutoAttack on the
# full 10k test set: PGD-AT, HAM and HAM train_at_m (branched from PGD-AT at epoch 6) and TRADES
# at seeds 0-2, then the fairness suite (MART, AWP, EMA, CFA, WAT, DAFA, FAAL) at seed 0. The
# runs of a suite train at once (the GPU is far from busy with one small CNN), so per-run wall
# times are shared; the CPU tables beside them are the wall-time evidence.
#
#   HAMJAX_DATA_DIR=/path/with/fashion-mnist bash benchmarks/gpu_evidence.sh [ROOT]
#   SUITES="evidence fairness noisy_full" bash benchmarks/gpu_evidence.sh
#
# Workdirs go under ROOT (default runs/gpu); the tables go to
# benchmarks/results/fashion_mnist_{evidence,fairness}_<TAG>.json and docs/results/ (TAG
# default gpu), beside the CPU tables, so the two backends check each other.
set -euo pipefail
ROOT=${1:-runs/gpu}
TAG=${TAG:-gpu}
EXAMPLES=${EXAMPLES:-10000}
SUITES=${SUITES:-evidence fairness}  # add noisy_full (20% pair-flip noise) when time allows
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # a dozen processes share the GPU
DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || true)"
for suite in $SUITES; do
  case "$suite" in
    evidence) seeds="0 1 2"; parallel=12 ;;
    fairness) seeds="0"; parallel=7 ;;
    noisy_full) seeds="0 1 2"; parallel=12 ;;  # the warm starts first, then 7 fine-tunes each
    *) echo "SUITES: unknown suite $suite (evidence, fairness, noisy_full)" >&2; exit 2 ;;
  esac
  # shellcheck disable=SC2086
  python benchmarks/fashion_mnist_compare.py --suite="$suite" --seeds $seeds \
    --parallel "$parallel" --autoattack_examples "$EXAMPLES" --root="$ROOT" --tag="$TAG" \
    --step_times ""  # the committed step times are the CPU's: they price no GPU run
done
echo "trained on $DEVICE"

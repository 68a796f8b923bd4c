#!/bin/bash
# Issue-26 speed measurements on one GPU, in priority order, each step bounded so the whole fits
# one ~10-minute device call (about 600 s of bounds; WRN=1 adds 120 s); every step writes its JSON to OUT (default benchmarks/results/gpu).
#
#   HAMJAX_DATA_DIR=/path/with/fashion-mnist bash benchmarks/gpu_speed.sh [OUT]
#
# Needs jax[cuda], torch with CUDA and Fashion-MNIST (for step 3). Where only a few files may
# come back (a lent device), write to a scratch folder and pack it:
#   bash benchmarks/gpu_speed.sh /tmp/gpu; tar czf "$OUT/gpu_speed.tgz" -C /tmp gpu
#
# 1. the jitted PGD-AT step against eager and compiled PyTorch (torch.compile, default mode) on
#    the same GPU, with FLOP/s and fraction of peak: PreAct-ResNet-18 at batch 128 and 512 in
#    float32 and bfloat16, the small CNN and fmnist_cnn at 128 in float32;
# 2. train.steps_per_dispatch 1 against 16 for the small CNNs' PGD-AT and HAM steps;
#    HAM / PGD-AT step time per hard fraction (0.15-0.6) with the ideal beside it, at the
#    paper's batch (128), PreAct-ResNet-18; and per device batch 32-256 the faithful step
#    against the cross-batch one (method.cross_batch_rows);
# 3. bfloat16 against float32 training accuracy: configs/fashion_mnist.py PGD-AT, both at once;
# 4. with WRN=1, WRN-34-10 at batch 128, float32, against eager and compiled torch.
# A step that runs past its bound is cut and the next one starts; what finished is in OUT.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu}
mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_')
tag() { echo "${GPU:-gpu}"; }
bound() { local seconds=$1; shift; timeout --signal=TERM --kill-after=10 "$seconds" "$@"; }

for dtype in float32 bfloat16; do for batch in 128 512; do
  bound 65 python benchmarks/train_throughput.py --vs_torch --torch_device cuda \
    --models preact_resnet18 --batch $batch --dtype $dtype --repeats 10 \
    > "$OUT/vs_torch_preact_resnet18_b${batch}_${dtype}_$(tag).json" 2>>"$OUT/stderr.log"
done; done
bound 60 python benchmarks/train_throughput.py --vs_torch --torch_device cuda \
  --models small_cnn fmnist_cnn --batch 128 --repeats 20 \
  > "$OUT/vs_torch_cnns_b128_float32_$(tag).json" 2>>"$OUT/stderr.log"
for n in 1 16; do  # train.steps_per_dispatch on the launch-bound small models
  bound 40 python benchmarks/train_throughput.py --models small_cnn fmnist_cnn \
    --methods pgd_at ham --batch 128 --repeats 20 --steps_per_dispatch $n \
    > "$OUT/steps_per_dispatch_${n}_cnns_b128_$(tag).json" 2>>"$OUT/stderr.log"
done
bound 45 python benchmarks/ham_cost.py --model preact_resnet18 --batch 128 --repeats 10 \
  > "$OUT/ham_cost_preact_resnet18_b128_$(tag).json" 2>>"$OUT/stderr.log"
bound 45 python benchmarks/ham_cost.py --model preact_resnet18 --per_device_batches 32 64 128 256 \
  --cross_batch_rows 128 --repeats 10 \
  > "$OUT/ham_cost_small_batches_cross_batch_$(tag).json" 2>>"$OUT/stderr.log"
for dtype in float32 bfloat16; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 bound 110 python launch.py \
    --config=configs/fashion_mnist.py:method=pgd_at --config.model.dtype=$dtype \
    --workdir="/tmp/fmnist_pgdat_$dtype" > "$OUT/fmnist_pgdat_${dtype}.log" 2>&1 &
done; wait
for dtype in float32 bfloat16; do
  cp "/tmp/fmnist_pgdat_$dtype/metrics.jsonl" "$OUT/fmnist_pgdat_${dtype}_metrics_$(tag).jsonl"
  cp "/tmp/fmnist_pgdat_$dtype/report.json" "$OUT/fmnist_pgdat_${dtype}_report_$(tag).json" \
    2>/dev/null || echo "no report for $dtype (cut by its bound)" >> "$OUT/stderr.log"
done
if [ "${WRN:-0}" = 1 ]; then
  bound 120 python benchmarks/train_throughput.py --vs_torch --torch_device cuda \
    --models wrn34_10 --batch 128 --repeats 5 \
    > "$OUT/vs_torch_wrn34_10_b128_float32_$(tag).json" 2>>"$OUT/stderr.log"
fi
ls -la "$OUT"

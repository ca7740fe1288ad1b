#!/usr/bin/env bash
# The GPU checks of RESULTS.md's "On one GPU" section, in one go, on a machine with CUDA:
#   1. the GPU tests (tests/test_gpu.py, tests/test_kernels_gpu.py), Triton compiled for the device;
#   2. benchmarks/bench_gpu.py (products, hypergradients, kernels, inner step; ratios in one run);
#   3. meanwhile, on two otherwise idle CPU cores (taskset), the CPU ratio benchmarks that need a
#      quiet machine (inner-step overhead, HVP and IFT costs), one torch thread.
# Usage: benchmarks/run_gpu.sh OUTDIR   (works from a plain checkout: no install needed)
set -uo pipefail
out=${1:?usage: benchmarks/run_gpu.sh OUTDIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
# the package maps kernels/ to bilevel.kernels at install time; without an install, link it
[ -e bilevel/kernels ] || ln -s ../kernels bilevel/kernels
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; nproc; } > "$out/machine.txt" 2>&1

cpu_cores=${CPU_CORES:-6,7}
( OMP_NUM_THREADS=1 taskset -c "$cpu_cores" "$py" -m pytest -q -p no:cacheprovider benchmarks/bench_inner_step.py benchmarks/bench_hvp.py \
    benchmarks/bench_ift.py --benchmark-only --benchmark-min-rounds=10 --benchmark-max-time=1 \
    --ratios-json="$out/cpu_ratios.json" > "$out/cpu_bench.log" 2>&1; echo "cpu benchmarks rc=$?" >> "$out/cpu_bench.log" ) &
cpu_pid=$!

"$py" -m pytest -q -p no:cacheprovider -rs tests/test_kernels_gpu.py tests/test_gpu.py > "$out/gpu_tests.log" 2>&1
echo "gpu tests rc=$?" | tee -a "$out/gpu_tests.log"
"$py" -m pytest -q -p no:cacheprovider benchmarks/bench_gpu.py --benchmark-json="$out/gpu_bench.json" \
    --gpu-report="$out/gpu_report.md" > "$out/gpu_bench.log" 2>&1
echo "gpu benchmarks rc=$?" | tee -a "$out/gpu_bench.log"
wait "$cpu_pid"
tail -3 "$out/cpu_bench.log"
tail -5 "$out/gpu_tests.log"

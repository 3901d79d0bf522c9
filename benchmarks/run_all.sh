#!/usr/bin/env bash
# Full benchmark runs, written to benchmarks/RESULTS.md (overwritten) and echoed to the terminal.
# Run on an otherwise idle machine: load from other processes skews the timings.
#   bash benchmarks/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/RESULTS.md
versions=$(python -c 'import platform, jax, torch
print(f"python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__}")')

cat > "$out" <<HEADER
# Benchmark results

- date: $(date -u '+%Y-%m-%d %H:%M UTC')
- machine: $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores
- $versions
HEADER

status=0
for bench in encoders maxsim pipeline search; do
  printf '\n## %s\n\n`python benchmarks/%s.py`\n\n```\n' "$bench" "$bench" >> "$out"
  # Only stdout goes into the file; warnings on stderr stay on the terminal.
  python "benchmarks/$bench.py" | tee -a "$out" || status=1
  printf '```\n' >> "$out"
done
echo "wrote $out"
exit $status

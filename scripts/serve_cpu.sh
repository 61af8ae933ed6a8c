#!/usr/bin/env bash
# Run `moeplace serve` on N CPU ranks (gloo, one thread each); extra arguments go to serve.
#   scripts/serve_cpu.sh 4 --model checkpoints/tiny-moe --placement placement.json --port 8000
#   scripts/serve_cpu.sh 4 --model checkpoints/tiny-moe --prompts prompts.txt --out out.jsonl
# On GPUs: `moeplace serve --nproc-per-node N ...` without --device cpu (one rank per GPU, NCCL).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NUM_RANKS [moeplace serve options...]" >&2
  exit 2
fi
ranks=$1
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # ranks share the cores: one thread each
exec moeplace serve --nproc-per-node "$ranks" --device cpu "$@"

#!/usr/bin/env bash
# Nsight Compute profiles of the cases in benchmarks/profile_ncu.py (all, or those named in
# CASES), one text report per run into $OUT/ncu.txt. Needs ncu on PATH (or NCU=/path/to/ncu)
# and access to the GPU performance counters. CASE_S: seconds per case (GGUF cases quantize an
# 8192 x 8192 weight in Python first: give them 150).
set -u
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)}
if [ -z "$NCU" ]; then echo "no ncu found (set NCU=...)" | tee "$OUT/ncu.txt"; exit 1; fi
CASES=${CASES:-$(python3 benchmarks/profile_ncu.py --list | awk '{print $1}')}
for c in $CASES; do
  echo "=== case $c" >> "$OUT/ncu.txt"
  timeout ${CASE_S:-150} "$NCU" --profile-from-start off --section SpeedOfLight --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \
      python3 benchmarks/profile_ncu.py --case "$c" >> "$OUT/ncu.txt" 2>&1
  echo "=== rc $?" >> "$OUT/ncu.txt"
done

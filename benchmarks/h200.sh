#!/usr/bin/env bash
# The H200 run behind benchmarks/results/: GPU tests, the tuning table, then the benchmark with
# peers (omniq's chosen kernel per M, CUDA-graph replay over rotating weight copies).
# Run from the repository root on a CUDA machine; OUT names the output folder.
#   STAGES="tests tune bench" (default all), BENCH_S / TEST_S / TUNE_S: time limits (s)
#   TUNE_SCHEMES / TUNE_M: re-tune only these schemes / M values (merged into the shipped table)
#   OMNIQ_COMMIT: the commit to record where the tree is not a git checkout (a `git archive`)
set -u
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
STAGES=${STAGES:-tune bench tests}
export PYTHONUNBUFFERED=1
# install omniq without network: point omniq.kernels / omniq.backends at the top-level dirs
ln -sfn ../kernels omniq/kernels; ln -sfn ../backends omniq/backends; export PYTHONPATH=$PWD
[ -f .whl/gemlite-0.6.0.post2.tar.gz ] && python3 -m pip install -q --no-deps --no-build-isolation \
    .whl/gemlite-0.6.0.post2.tar.gz > "$OUT/gemlite.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import gemlite; print('gemlite', gemlite.__version__)" 2>&1 | tail -1
  echo "commit ${OMNIQ_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; date -u; } > "$OUT/env.txt"
SCHEMES=${SCHEMES:-gptq:bits=4:group_size=128,int8,fp8,mxfp4:activation=None,nvfp4:activation=None,mxfp8,gguf:type=q4_k,gguf:type=q8_0}
SHAPES=${SHAPES:-8192x8192,12288x3072,3072x12288}
MS=${BENCH_M:-1,16,64,512,2048}
if [[ " $STAGES " == *" tune "* ]]; then
  # a re-tune of some schemes (TUNE_SCHEMES) merges into the shipped table, keeping the others
  [ -n "${TUNE_SCHEMES:-}" ] && cp omniq/dispatch/tuning/nvidia-h200.json "$OUT/"
  timeout ${TUNE_S:-150} python3 -m omniq tune --device cuda --schemes "${TUNE_SCHEMES:-$SCHEMES}" --shapes "$SHAPES" \
      --m "${TUNE_M:-$MS}" \
      --output "$OUT/nvidia-h200.json" > "$OUT/tune.log" 2>&1
  echo "tune rc=$?" >> "$OUT/env.txt"; rm -f "$OUT"/*.lock
  # the benchmark below runs with the table just measured, as the package will ship it
  [ -s "$OUT/nvidia-h200.json" ] && mkdir -p omniq/dispatch/tuning && cp "$OUT/nvidia-h200.json" omniq/dispatch/tuning/
fi
if [[ " $STAGES " == *" bench "* ]]; then
  BENCH_S=${BENCH_S:-300}
  timeout $((BENCH_S + ${BENCH_GRACE:-90})) python3 benchmarks/run.py --device cuda --schemes "$SCHEMES" --shapes "$SHAPES" \
      --m "$MS" --graph --peers --chosen-only --overhead --budget 0.1 --no-progress --max-seconds "$BENCH_S" \
      --json "$OUT/h200.json" --md "$OUT/h200.md" --plot "$OUT/plots" > "$OUT/bench.txt" 2>&1
  echo "bench rc=$?" >> "$OUT/env.txt"
  [ -d "$OUT/plots" ] && tar -C "$OUT" -czf "$OUT/plots.tgz" plots && rm -rf "$OUT/plots"
fi
if [[ " $STAGES " == *" tests "* ]]; then
  timeout ${TEST_S:-200} python3 -m pytest -q -m gpu -p no:cacheprovider -n 12 tests/test_gpu_*.py \
      > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$? $(tail -1 "$OUT/gpu_tests.log")" >> "$OUT/env.txt"
fi

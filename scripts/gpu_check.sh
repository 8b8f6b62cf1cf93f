#!/usr/bin/env bash
# The GPU check, in one call: on a machine with an NVIDIA GPU and CuPy (nothing is installed),
# run the test suite with CuPy as the default backend, then the bench on CuPy and on NumPy.
# Logs and both bench JSONs go to $OUT (default ./gpu-check-out). On a machine without CuPy
# the CuPy half reports the clear "CuPy is not available" error and the NumPy half still runs.
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MINIPEFT_CACHE=$(mktemp -d)
export MINIPEFT_CACHE
PY=${PYTHON:-python3}

$PY -c "import minipeft.backend as b; print('backends available:', b.available())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

echo "== test suite, MINIPEFT_BACKEND=cupy =="
MINIPEFT_BACKEND=cupy $PY -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/pytest_cupy.log"

echo "== bench, cupy (L: C1024 L12 H16 T1024 B8; the goal is >= 40% of the in-run matmul peak) =="
MINIPEFT_BACKEND=cupy $PY -m minipeft.bench --configs S,M,L --json "$OUT/bench_cupy.json" 2>&1 \
  | tee "$OUT/bench_cupy.log"

echo "== bench, numpy (same machine) =="
MINIPEFT_BACKEND=numpy $PY -m minipeft.bench --json "$OUT/bench_numpy.json" 2>&1 \
  | tee "$OUT/bench_numpy.log"

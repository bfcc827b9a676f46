#!/usr/bin/env bash
# Incremental rebuild of the extensions into deepkernels/ for development (`make` reinstalls from scratch).
# Each .so is moved into place with a rename, so processes that already loaded the old one keep running.
set -euo pipefail
cd "$(dirname "$0")/.."
# One build at a time in this tree (several shells may rebuild at once).
mkdir -p build
exec 9>build/.dev-build.lock
flock 9
PY=${PY:-.venv/bin/python}
MAX_JOBS=${MAX_JOBS:-2} DEEPKERNELS_REQUIRE_CUDA=${DEEPKERNELS_REQUIRE_CUDA-1} "$PY" setup.py -q build_ext \
  --build-lib build/lib-dev --build-temp build/temp-dev > build/dev-build.log 2>&1 || { grep -E -B2 -A8 'error' build/dev-build.log | tail -60; exit 1; }
for so in build/lib-dev/deepkernels/*.so; do
  cp "$so" "deepkernels/.$(basename "$so").new"
  mv -f "deepkernels/.$(basename "$so").new" "deepkernels/$(basename "$so")"
done
echo "built: $(ls build/lib-dev/deepkernels/*.so | xargs -n1 basename | tr '\n' ' ')"

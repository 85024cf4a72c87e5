#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one H100): gpu tests, GNMT v2 training and beam-5
# decoding throughput, and Multi30k BLEU after a few minutes of training when the corpus is given.
#
#   benchmarks/gpu_check.sh OUT_DIR [--corpus DIR] [--train-minutes M] [more gpu_check.py args]
#
# Results: OUT_DIR/gpu_check.json (written after each stage), OUT_DIR/pytest_gpu.txt,
# OUT_DIR/nvidia-smi.txt. --corpus names a folder holding multi30k/
# (a copy of ../shared/corpora/multi30k will do); without it that stage is skipped.
#
# Python: .venv/bin/python if the checkout has one, else $PYTHON, else python3. HF `datasets`
# is needed by the tests that prepare data and by the Multi30k stage; where it is missing, wheels
# in .whl/ (datasets, dill, multiprocess) are installed into /tmp/site first, e.g. made with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [--corpus DIR] [--train-minutes M]}
shift
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! "$PY" -c "import datasets" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
mkdir -p "$OUT"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$OUT" "$@"

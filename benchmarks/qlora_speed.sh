#!/usr/bin/env bash
# The device-side entry point: install the carried wheels (.whl/, from benchmarks/fetch_wheels.sh), then run
# benchmarks/qlora_speed.py with every argument given here. From the repository root, on the device machine:
#     bash benchmarks/qlora_speed.sh --out $OUT --suites real,fixed --variants plain,fused --check real
# (device call: carry [".whl", "bench_data"]; see benchmarks/RESULTS.md for bench_data/'s layout).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/: using the packages installed here" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# offline: nothing can be fetched there, and a hub lookup would only time out
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python3 benchmarks/qlora_speed.py "$@"

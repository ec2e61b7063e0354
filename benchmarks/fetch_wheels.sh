#!/usr/bin/env bash
# Download, HERE (a machine with PyPI), the wheels the device machine lacks, into .whl/ (git-ignored), for
# benchmarks/qlora_speed.sh to install there (it has no package index). Run from the repository root:
#     bash benchmarks/fetch_wheels.sh            # then carry .whl (and bench_data) in the device call
#
# The device image (Python 3.12, /opt/torch/.venv: torch 2.11 cu130, transformers 5.17, peft 0.21.2,
# lightning + pytorch-lightning 2.6.6, torchmetrics, tensorboard, pandas, pyarrow, xxhash, fsspec, aiohttp,
# huggingface_hub 1.33, sentencepiece, protobuf, accelerate, triton; /work/.library/device/KINDS.md) lacks:
#   bitsandbytes                          4-bit layers and paged AdamW          (needs torch, numpy, packaging: there)
#   datasets + dill + multiprocess        our data pipeline                     (datasets' other needs are there:
#                                                                                filelock numpy pyarrow>=24 pandas
#                                                                                requests tqdm xxhash fsspec
#                                                                                huggingface-hub>=1.31 pyyaml)
#   jsonargparse + docstring-parser + typeshed-client   LightningCLI (jsonargparse[signatures]; PyYAML, typing-
#                                                                                extensions: there)
#   torchdata                             StatefulDataLoader                    (urllib3, requests: there)
#   liger-kernel                          model.loss fused on CUDA (optional)   (torch, triton: there)
#   py-spy                                benchmarks --pyspy: where the CPU time of a step goes
# Versions are this project's venv's (pip list), so the device runs what the CPU tests ran.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
WHEELS=(
  bitsandbytes==0.50.2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
  torchdata==0.11.0
  liger-kernel==0.8.5
  py-spy==0.4.3                           # benchmarks: --pyspy (a static binary in a py2.py3 wheel)
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"

# bitsandbytes ships a library for every CUDA/ROCm/XPU version (43 MB); the device's torch is cu130, so keep the
# CUDA 13 and CPU ones (the working tree a device call carries is limited to 64 MiB). RECORD loses the same lines.
BNB=$(ls .whl/bitsandbytes-0.50.2-*.whl)
if unzip -l "$BNB" | grep -q libbitsandbytes_cuda118; then
  tmp=$(mktemp -d)
  unzip -q "$BNB" -d "$tmp"
  find "$tmp/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
  record=$(ls "$tmp"/bitsandbytes-*.dist-info/RECORD)
  grep -v -E 'libbitsandbytes_(cuda1[0-2][0-9]|rocm|xpu)' "$record" > "$record.new" && mv "$record.new" "$record"
  rm "$BNB"
  (cd "$tmp" && python3 -m zipfile -c "$OLDPWD/$BNB" bitsandbytes bitsandbytes-*.dist-info)
  rm -rf "$tmp"
fi
ls -la .whl
du -sh .whl

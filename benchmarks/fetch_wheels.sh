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
#   gguf                                  reading the SmolLM2 GGUF (fetch --source FILE.gguf)
#   nltk + click, joblib, defusedxml; rouge-score + absl-py     ROUGE with the Porter stemmer (rouge-score's)
#   sacrebleu + portalocker, tabulate, colorama, lxml            BLEU
# Versions come from constraints.txt (the versions the CPU suite passed with): one list, not two. The device
# keeps its own torch, transformers, peft and lightning (a CUDA build; upgrading transformers would pull a new
# huggingface_hub and its dependencies); runs record what they ran with (perf.json "versions").
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
NAMES=(
  bitsandbytes datasets dill multiprocess jsonargparse docstring-parser typeshed-client torchdata
  liger-kernel py-spy gguf nltk click joblib defusedxml absl-py sacrebleu portalocker tabulate colorama lxml
)
SDIST_ONLY=(rouge-score)  # pure Python, published as a source archive only: built into a wheel here
pin_of() {
  # constraints.txt writes names as pip freeze does (docstring_parser, rouge_score): compare normalised
  local pin
  pin=$(grep -i -E "^${1//[-_]/[-_]}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "fetch_wheels.sh: $1 has no version in constraints.txt" >&2; exit 1; }
  echo "$pin"
}
WHEELS=()
for name in "${NAMES[@]}"; do WHEELS+=("$(pin_of "$name")"); done
for name in "${SDIST_ONLY[@]}"; do python3 -m pip wheel -q --no-deps -w .whl "$(pin_of "$name")"; done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
  --platform manylinux1_x86_64 --platform any \
  -d .whl "${WHEELS[@]}"

# bitsandbytes ships a library for every CUDA/ROCm/XPU version (43 MB); the device's torch is cu130, so keep the
# CUDA 13 and CPU ones (the working tree a device call carries is limited to 64 MiB). RECORD loses the same lines.
BNB=$(ls .whl/bitsandbytes-*.whl)
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

#!/usr/bin/env bash
# Run HERE (a machine with PyPI and npm), before a GPU session: puts into .whl/ the Llama-2 tokenizer and the wheels that benchmarks/gpu_check.sh
# installs on the GPU machine, which reaches no package registry. Its image already has PyTorch, CUDA, timm's and
# transformers' common dependencies; these are the locked versions (requirements/lock.txt) of what litegpt needs
# beyond that, for CPython 3.12 on x86-64. DeepSpeed ships only a source archive: its wheel is built here
# (pure Python; its CUDA ops are compiled just in time where needed, and litegpt's client AdamW needs none).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
NAMES="transformers tokenizers peft open_clip_torch timm webdataset braceexpand ftfy wcwidth hjson pydantic
pydantic_core annotated-types typing-inspection pydicom pylibjpeg pylibjpeg-rle pylibjpeg-openjpeg"
pins=()
for name in $NAMES; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" requirements/lock.txt) || { echo "gpu_wheels.sh: $name is not in requirements/lock.txt" >&2; exit 2; }
  pins+=("$pin")
done
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(grep -i '^deepspeed==' requirements/lock.txt)"
# the Llama-2 tokenizer (litegpt.model.reduced fetches it from npm, which the GPU machine cannot reach)
"$PY" -c "from litegpt.model.reduced import llama2_tokenizer; llama2_tokenizer().save_pretrained('.whl/llama2-tokenizer')"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
du -sh .whl

#!/usr/bin/env bash
# The wheels a bare GPU machine (Python 3.12, torch/transformers/safetensors/scipy/click/rich/tqdm/
# pytest installed, no network) lacks for benchmarks/gpu_check.sh, downloaded into .whl/ (ignored
# by git). Run here, from the repository root.
set -euo pipefail
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any"
for pkg in optuna sqlalchemy alembic pydantic pydantic-core annotated-types typing-inspection typing-extensions \
           greenlet mako markupsafe colorlog pyyaml gguf accelerate psutil matplotlib contourpy cycler fonttools kiwisolver pyparsing pillow python-dateutil six; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl "$pkg"
done
du -sh .whl

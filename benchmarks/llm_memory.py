"""Memory bounded by the model: a search's peak memory against the model and its packed bank, on
SmolLM2 and on a random LLaMA-shaped model 4× larger, and how the bank and sensitivity time scale.

For each model, in one run:

* **memory**: ``mpsearch search SPEC --workers 0 --trials N`` in a child process that reports its
  own peak: on the CPU its peak RSS less the RSS of the same process before the model is loaded
  (Python, torch and the libraries: the runtime); on CUDA ``torch.cuda.max_memory_allocated``.
  Ratio = that peak ÷ (model bytes at its dtype + packed bank bytes). Target ≤ 1.5.
* **scaling**: in this process, the candidate bank built from scratch and the default sensitivity
  profile (Hessian traces, Gauss–Newton), timed; seconds per quantizable weight, the 4× model's
  over SmolLM2's. Target ≤ 1.3. Both wall seconds and this process's CPU seconds are reported:
  on a shared machine the CPU seconds are the figure that other load does not move.

``--only memory`` or ``--only scaling`` runs one half.

The data are small (the search's evaluations are not what is measured); the 4× model has random
weights and SmolLM2's tokenizer. From the repository root (about half an hour on 2 CPU cores):

    .venv/bin/python benchmarks/llm_memory.py [--device cpu|cuda] [--models smollm2,llama4x] [--calibration 8]

``--models llama1b`` is the ~1 B-weight random LLaMA that ``benchmarks/gpu_check.sh`` runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

# name -> (hidden, intermediate, layers, heads, kv heads); None: the real SmolLM2
SHAPES = {
    "smollm2": None,
    "llama4x": (1152, 3072, 30, 18, 6),  # 4.0× SmolLM2's 106 M quantizable weights
    "llama1b": (2048, 5632, 22, 32, 4),  # ~0.97 B quantizable weights (TinyLlama's shape)
}

CHILD = """
import json, os, sys, time
import psutil, torch, transformers, optuna, sqlalchemy  # the runtime, loaded before any model
runtime = psutil.Process().memory_info().rss
from mpsearch.cli import main
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
code = main(sys.argv[1:])
seconds = time.perf_counter() - start
# VmHWM, this address space's high-water mark: ru_maxrss would start from the forking parent's RSS.
peak_rss = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("PEAK " + json.dumps({"runtime_rss": runtime, "peak_rss": peak_rss, "gpu": gpu, "seconds": seconds, "code": code}), file=sys.stderr)
"""


def model_source(name: str, folder: Path) -> str:
    """The spec's model.source: smollm2, or a random LLaMA saved as a Hugging Face folder."""
    if SHAPES[name] is None:
        return "smollm2"
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from mpsearch.workload.models import smollm2_dir

    hidden, intermediate, layers, heads, kv = SHAPES[name]
    out = folder / name
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
        )
        LlamaForCausalLM(config).save_pretrained(out)
        AutoTokenizer.from_pretrained(smollm2_dir()).save_pretrained(out)
    return f"hf:{out}"


def write_spec(name: str, folder: Path, args) -> Path:
    source = model_source(name, folder)
    text = (Path(__file__).resolve().parent.parent / "studies" / "smollm2.toml").read_text()
    for line, new in (
        ('source = "smollm2"', f'source = "{source}"'),
        ("calibration = 128", f"calibration = {args.calibration}"),
        ("evaluation = 128", f"evaluation = {args.evaluation}"),
        ("max_length = 128", f"max_length = {args.max_length}"),
        ('device = "auto"', f'device = "{args.device}"'),
    ):
        text = text.replace(line, new)
    path = folder / f"{name}.toml"
    path.write_text(text + textwrap.dedent(f"""
        [storage]
        url = "sqlite:///{folder / (name + '.db')}"
    """))
    return path


def memory(spec: Path, args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "search", str(spec), "--workers", "0", "--trials", str(args.trials), "--json"],
        capture_output=True, text=True, env=env,
    )
    if "PEAK " not in out.stderr:
        raise SystemExit(f"the search failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stderr.rsplit("PEAK ", 1)[1].splitlines()[0])


def sizes(spec: Path, device: str) -> tuple[int, int, int]:
    """(model bytes at its dtype, packed bank bytes, quantizable weights)."""
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    workload = Workload(Spec.load(spec), device="cpu")
    table = workload.layer_table()
    model_bytes = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in workload.loaded.model.state_dict().values()}.values())
    bank_bytes = sum(table.layer_bytes(n, b) for n in table.names for b in table.menu)
    return model_bytes, bank_bytes, table.n_weights


def scaling(spec: Path, device: str, cache: str) -> tuple[float, float, float, float]:
    """(bank seconds, sensitivity seconds, bank CPU seconds, sensitivity CPU seconds), each from scratch."""
    from mpsearch.sensitivity.analyze import analyze
    from mpsearch.spec import Spec
    from mpsearch.workload import Workload

    workload = Workload(Spec.load(spec), device=device)
    workload.reference("calibration")
    workload.model_key()
    sync = __import__("torch").cuda.synchronize if device == "cuda" else (lambda: None)
    start, cpu = time.perf_counter(), time.process_time()
    workload.candidate_bank(cache_dir=cache)
    sync()
    bank, bank_cpu = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    analyze(workload, "hessian", None)
    sync()
    return bank, time.perf_counter() - start, bank_cpu, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,llama4x")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibration", type=int, default=8)
    parser.add_argument("--evaluation", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--only", choices=["memory", "scaling"], default=None, help="run one half")
    parser.add_argument("--folder", default=None, help="where the specs, random models and databases go (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="mpsearch-llm-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPSEARCH_CACHE_DIR", str(folder / "banks"))

    rows = {}
    for name in args.models.split(","):
        spec = write_spec(name, folder, args)
        model_bytes, bank_bytes, weights = sizes(spec, args.device)
        r = rows[name] = {"weights": weights, "model_bytes": model_bytes, "bank_bytes": bank_bytes}
        print(f"{name}: {weights / 1e6:.1f} M quantizable weights; model {model_bytes / 2**20:.0f} MiB + bank {bank_bytes / 2**20:.0f} MiB", flush=True)
        if args.only != "scaling":
            peak = memory(spec, args)
            used = peak["gpu"] if args.device == "cuda" else peak["peak_rss"] - peak["runtime_rss"]
            r.update(used=used, ratio=used / (model_bytes + bank_bytes), search_s=peak["seconds"], **peak)
            what = "peak GPU memory" if args.device == "cuda" else f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB − runtime {r['runtime_rss'] / 2**20:.0f} MiB ="
            print(f"  memory: {what} {used / 2**20:.0f} MiB; ratio {r['ratio']:.2f} (target <= 1.5); search {r['search_s']:.0f} s", flush=True)
        if args.only != "memory":
            bank_s, sens_s, bank_cpu, sens_cpu = scaling(spec, args.device, str(folder / f"fresh-{name}-{time.time_ns()}"))
            r.update(bank_s=bank_s, sensitivity_s=sens_s, bank_cpu_s=bank_cpu, sensitivity_cpu_s=sens_cpu,
                     per_weight_ns=(bank_s + sens_s) / weights * 1e9, per_weight_cpu_ns=(bank_cpu + sens_cpu) / weights * 1e9)
            print(f"  bank {bank_s:.1f} s + sensitivity {sens_s:.1f} s = {r['per_weight_ns']:.1f} ns per weight "
                  f"(CPU: {bank_cpu:.1f} s + {sens_cpu:.1f} s = {r['per_weight_cpu_ns']:.1f} ns)", flush=True)
    names = [n for n in rows if "per_weight_ns" in rows[n]]
    if len(names) > 1:
        a, b = rows[names[0]], rows[names[-1]]
        for label, suffix in (("wall", "_s"), ("CPU", "_cpu_s")):
            bank = b["bank" + suffix] / b["weights"] / (a["bank" + suffix] / a["weights"])
            sens = b["sensitivity" + suffix] / b["weights"] / (a["sensitivity" + suffix] / a["weights"])
            total = (b["bank" + suffix] + b["sensitivity" + suffix]) / b["weights"] / ((a["bank" + suffix] + a["sensitivity" + suffix]) / a["weights"])
            print(f"scaling ({label} seconds): {names[-1]} / {names[0]} per weight = {total:.2f} (target <= 1.3); bank {bank:.2f}, sensitivity {sens:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()

"""Commands on a spec's model: `layers`, `quantize`, `analyze`; and `toolchain` (the runtimes exports are checked with)."""

from __future__ import annotations

from pathlib import Path

import click

from mpsearch.cli import cli
from mpsearch.cli._common import (
    RegistryChoice, cell, device_option, emit_json, finite, load_spec, show_progress, spec_storage_option, unseen_warning, wide_console,
)
from mpsearch.errors import MPSearchError


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--errors", is_flag=True, help="Quantize every layer at every bit-width and add its SQNR (dB) and weight MSE.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def layers(spec: str, errors: bool, device: str, as_json: bool) -> None:
    """List the quantizable layers of SPEC's model, with their bytes at each bit-width.

    Bytes follow DESIGN.md: packed codes plus scales (and zero points), fp16 at 16 bits;
    `other_bytes` is everything else in the model, so bytes(plan) = Σ bytes[l][b] + other_bytes.
    With --errors, each layer's quantization error at each bit-width under the spec's
    method (the candidate bank, cached on disk) is added.
    """
    from mpsearch.errors import BudgetError
    from mpsearch.workload import Workload

    s = load_spec(spec)
    workload = Workload(s, device=device)
    table = workload.layer_table()
    budget = s.budget.to_budget()
    document = table.to_json()
    try:
        limit = table.budget_bytes(budget)
        document["budget"] = {"spec": str(budget), "bytes": limit, "bpw": (limit - table.other_bytes) * 8 / table.n_weights}
    except BudgetError as e:  # the layers are still worth listing; the budget's problem is named with them
        document["budget"] = {"spec": str(budget), "bytes": None, "bpw": None, "error": str(e)}
    if errors:
        bank = workload.candidate_bank(progress=show_progress())
        stats = bank.errors()
        for row in document["layers"]:
            per_bits = stats[row["name"]]
            row["sqnr"] = {str(b): finite(e["sqnr"]) for b, e in per_bits.items()}
            row["mse"] = {str(b): e["mse"] for b, e in per_bits.items()}
            if row["name"] in bank.notes:
                row["note"] = bank.notes[row["name"]]
        document["method"] = s.quant.method
    if as_json:
        emit_json(document)
        return
    _print_layers(document)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--bits", required=True, help="The menu entry every layer gets: a bit-width of quant.bits, or a scheme option of quant.options (e.g. 3a, 2g64a).")
@click.option("--method", type=RegistryChoice("mpsearch.quant.apply:QUANTIZERS"), default=None, help="Override the spec's quant.method.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a line.")
def quantize(spec: str, bits: str, method: str | None, device: str, as_json: bool) -> None:
    """Quantize every layer of SPEC's model at BITS (a menu entry) and score it: the uniform baseline.

    Prints the loss on the evaluation set, the exact bytes and the bpw of the uniform plan.
    """
    from mpsearch.workload import Workload

    s = load_spec(spec)
    if method is not None:
        s = s.with_overrides(quant={**s.quant.model_dump(), "method": method})
    from mpsearch.plan import width_key

    bits = width_key(bits)
    menu = [*s.quant.bits, *s.quant.options]
    if bits not in menu:
        raise MPSearchError(f"--bits {bits} is not in the spec's menu {menu} (quant.bits and quant.options); pick one of those or add it to the spec")
    workload = Workload(s, device=device)
    table = workload.layer_table()
    plan = table.uniform(bits)
    bank = workload.candidate_bank(bits=[bits], progress=show_progress())
    model = workload.lend_model()  # the reference outputs are computed first; no second copy of the model
    result = workload.evaluate(bank.apply(model, plan, keep_fp=False))
    size = table.bytes(plan)
    method = "llama.cpp" if s.target.format == "gguf" else s.quant.method  # the gguf target's candidates are llama-quantize's
    document = {"bits": bits, "method": method, "bytes": size, "bpw": table.bpw(plan), "loss": result.loss, **result.metrics()}
    if as_json:
        emit_json(document)
        return
    ppl = f", perplexity {result.perplexity:.4g}" if result.perplexity is not None else ""
    label = f"{bits}-bit" if isinstance(bits, int) else str(bits)
    click.echo(f"uniform {label} {document['method']} on {workload.device}: loss {document['loss']:.6g}{ppl}, {size:,} bytes, {document['bpw']:.4g} bpw")


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--method", type=RegistryChoice("mpsearch.sensitivity:SENSITIVITY"), default="hessian", show_default=True, help="The sensitivity method.")
@click.option("--mode", type=click.Choice(["all", "per-layer"]), default="all", show_default=True, help="hessian: one Hessian-vector product per probe for all layers, or one per layer.")
@click.option("--estimator", type=click.Choice(["auto", "gn", "hvp"]), default="auto", show_default=True, help="hessian, all-at-once: Gauss-Newton output-space probes (exact for distillation losses, no cross-layer noise) or parameter-space Hessian-vector products; auto picks gn for distillation losses.")
@click.option("--tol", type=float, default=None, help="hessian: relative tolerance of the stopping rule (default: the spec's [sensitivity] tol, 0.05).")
@click.option("--max-probes", type=int, default=None, help="hessian: most probes per layer (default: the spec's [sensitivity] max_probes, 48).")
@click.option("--workers", type=int, default=2, show_default=True, help="perturbation: Ray actors (0: in this process).")
@click.option("--address", default=None, help="perturbation: an existing Ray cluster (default: local Ray).")
@spec_storage_option
@click.option("--recompute", is_flag=True, help="Compute again even if the database holds this profile.")
@device_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, writable=True), default=None, help="Write a bar chart of per-layer sensitivity (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def analyze(spec, method, mode, estimator, tol, max_probes, workers, address, storage, recompute, device, plot_path, as_json) -> None:
    """Rank SPEC's layers by how much quantizing them hurts.

    The profile is stored in the database, keyed by hashes of the model, the calibration
    data, the scheme and the settings: run again with nothing changed, it is read back.
    """
    from mpsearch.sensitivity.analyze import analyze as run_analysis
    from mpsearch.sensitivity.analyze import plot
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload

    s = load_spec(spec)
    if plot_path is not None:
        folder = Path(plot_path).resolve().parent
        if not folder.is_dir():
            raise MPSearchError(f"--plot: folder {str(folder)!r} does not exist; create it or pick another path")
    store = Storage(storage or s.storage.url)
    workload = Workload(s, device=device)
    profile = run_analysis(
        workload, method, store, mode=mode, estimator=estimator, tol=tol, max_probes=max_probes, workers=workers, address=address,
        progress=show_progress(), recompute=recompute,
    )
    if plot_path is not None:
        plot(profile, plot_path, workload.layer_table().menu)
        click.echo(f"plot written to {plot_path}", err=True)
    table = workload.layer_table()
    if as_json:
        emit_json({**profile.to_json(), "unseen": list(table.unseen)})
        return
    _print_profile(profile, table.menu)
    _print_unseen(table)


def _print_unseen(table) -> None:
    """Name the layers the loss cannot see: left out of the plan, or searched at no cost."""
    left = [name for name in table.unseen if name not in table.names]
    searched = [name for name in table.unseen if name in table.names and name not in table.pinned]
    if table.pinned:
        click.echo(f"kept at 16 bits in every plan, the loss cannot see them: {', '.join(table.pinned)} (layers.unseen = \"fp16\")")
    if left:
        click.echo(f"left out of the plan, the loss cannot see them: {', '.join(left)} (they stay at the model's dtype; layers.unseen = \"search\" puts them in)")
    if searched:
        click.echo(unseen_warning(searched))


def _print_profile(profile, menu) -> None:
    from rich.table import Table

    bits = [str(b) for b in menu]
    order = {name: i for i, name in enumerate(profile.ranking)}
    rows = sorted(profile.layers, key=lambda r: order[r["name"]])
    has_trace = "trace" in rows[0]
    flagged = any(row.get("flags") for row in rows)
    table = Table(title=f"{profile.method} sensitivity, most sensitive first" + (" (from the database)" if profile.reused else f" ({profile.seconds:.1f} s)"), title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("layer", no_wrap=True)
    if has_trace:
        table.add_column("trace", justify="right")
        if "trace_stderr" in rows[0]:
            table.add_column("± stderr", justify="right")
    for b in bits:
        table.add_column(f"{b}-bit", justify="right")
    if flagged:
        table.add_column("flags")
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["name"]]
        if has_trace:
            cells.append(f"{row['trace']:.4g}")
            if "trace_stderr" in row:
                cells.append(cell(row["trace_stderr"], ".2g"))
        cells += [f"{row['score'][b]:.3g}" for b in bits]
        if flagged:
            cells.append(", ".join(row.get("flags", [])))
        table.add_row(*cells)
    console = wide_console(170)
    console.print(table)
    if flagged:
        console.print("flags: negative = the trace came out below zero; probe-limit = still moving at the last probe. "
                      "A flagged profile is no warm start unless search.flagged_warm_starts = true.")


def _print_layers(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    menu = [str(b) for b in doc["menu"]]
    table = Table(title=f"{len(doc['layers'])} quantizable layers, {doc['n_weights']:,} weights", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("kind")
    for header in ("shape", "weights", *[f"{b}-bit B" for b in menu]):
        table.add_column(header, justify="right", no_wrap=True)
    with_errors = "sqnr" in doc["layers"][0]
    if with_errors:
        for b in menu:
            table.add_column(f"{b}-bit dB", justify="right", no_wrap=True)
    rules: dict[str, int] = {}  # a layer's grouping rule (a ragged last group, ...) as a numbered footnote, not in its name
    for row in doc["layers"]:
        name = row["name"] + (f" [{rules.setdefault(row['rule'], len(rules) + 1)}]" if row.get("rule") else "")
        cells = [f"{row['types'][b]} {row['bytes'][b]:,}" if "types" in row else f"{row['bytes'][b]:,}" for b in menu]  # gguf: the llama.cpp type too
        if with_errors:
            cells += [_db(row["sqnr"][b]) for b in menu]
        table.add_row(name, row["kind"], "×".join(map(str, row["shape"])), f"{row['n']:,}", *cells)
    console = Console()
    console.width = max(console.width, 210 if with_errors or "types" in doc["layers"][0] else 150)  # a layer table is wide; let it be, even in a pipe
    console.print(table)
    for rule, number in rules.items():
        console.print(f"[{number}] {rule}", markup=False)
    for item in doc["excluded"]:
        console.print(f"not quantized: {item['name']} — {item['reason']}", markup=False)
    searched = [name for name in doc.get("unseen", []) if name in {row["name"] for row in doc["layers"]} and name not in doc.get("pinned", [])]
    if doc.get("pinned"):
        console.print(f"kept at 16 bits in every plan, the loss cannot see them: {', '.join(doc['pinned'])} (layers.unseen = \"fp16\")", markup=False)
    if searched:
        console.print(unseen_warning(searched), markup=False)
    for row in doc["layers"]:
        if "note" in row:
            console.print(f"{row['name']}: {row['note']}")
    if with_errors:
        console.print(f"dB: signal-to-quantization-noise ratio of each layer's weight under {doc['method']}")
    console.print(f"other tensors: {doc['other_bytes']:,} bytes")
    console.print("whole model, uniform: " + ", ".join(f"{b}-bit {doc['total_bytes'][b]:,} B" for b in menu))
    b = doc["budget"]
    if b.get("error"):
        console.print(f"budget {b['spec']}: {b['error']}")
    else:
        console.print(f"budget {b['spec']}: {b['bytes']:,} bytes ({b['bpw']:.4g} bpw over the quantizable layers)")


def _db(x: float | None) -> str:
    return "exact" if x is None else f"{x:.1f}"




@cli.group()
def toolchain() -> None:
    """Build the runtimes mpsearch checks its exports with (into mpsearch's cache, once)."""


@toolchain.command(name="llama.cpp")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Parallel compile jobs (default: the CPU count).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (the tools' paths) instead of lines.")
def llama_cpp(jobs: int | None, as_json: bool) -> None:
    """Build llama.cpp's llama-quantize, llama-embedding and llama-perplexity from the source the
    pinned llama-cpp-python sdist vendors; a finished build is reused at once."""
    from mpsearch.quant import llama_cpp as toolchain_llama

    found = toolchain_llama.build(jobs=jobs, progress=show_progress() and not as_json, log=(lambda _: None) if as_json else click.echo)
    if as_json:
        emit_json(found.to_json())
        return
    click.echo(f"llama.cpp {found.version} (from llama-cpp-python's sdist) is built in {found.root}")
    for name, path in found.to_json()["tools"].items():
        click.echo(f"  {name:<18} {path}")
    click.echo(f"  {'convert':<18} {found.convert_script}")

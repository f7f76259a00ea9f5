"""Commands on studies: `search`, `studies`, `trials`, `report`, `export`, `eval`."""

from __future__ import annotations

import click

from mpsearch.cli import cli
from mpsearch.cli._common import cell, device_option, emit_json, load_spec, show_progress, spec_storage_option, storage_option, unseen_warning, wide_console
from mpsearch.export.targets import TARGETS


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Complete trials the study ends with, baselines included (default: the spec's search.trials).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Ray actors scoring plans; 0 scores in this process (default: the spec's search.workers).")
@click.option(
    "--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Start no trial after this many seconds of trials (set-up not counted); those running finish, --trials stays the most (default: the spec's search.time_limit_s).",
)
@click.option("--budget", default=None, help="Overrides the spec's budget: bytes (5000000), MiB (5.2MiB) or bpw (4.0bpw).")
@spec_storage_option
@click.option("--study", "study_name", default=None, help="Study name (default: SPEC's name and budget, e.g. minilm-4bpw).")
@click.option("--address", default=None, help="An existing Ray cluster, HOST:PORT of its head (default: a local Ray).")
@click.option("--resume", is_flag=True, help="Continue the study if it exists: keep its complete trials, re-run those a dead driver left running.")
@click.option("--pareto", is_flag=True, help="Two objectives, (loss, bytes): the whole front up to the budget in one study.")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def search(spec, trials, workers, time_limit, budget, storage, study_name, address, resume, pareto, device, as_json) -> None:
    """Search per-layer bit-widths for SPEC under its budget: an Optuna study scored on Ray.

    Warm starts (ILP on the Hessian and perturbation scores, greedy, every uniform plan that
    fits) run first and are reported as the baselines next to the best plan found.
    """
    from mpsearch.search.driver import Search, driver_device
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload

    s = load_spec(spec)
    if budget is not None:
        s = s.with_overrides(budget=budget)
    if trials is not None:  # validated as the spec's own search.trials is (its upper bound too)
        s = s.with_overrides(search={**s.search.model_dump(), "trials": trials})
    store = Storage(storage or s.storage.url)
    workload = Workload(s, device=driver_device(s, workers, device))
    run = Search(
        workload, store, study=study_name, trials=trials, workers=workers, time_limit_s=time_limit, address=address, resume=resume, pareto=pareto,
        progress=show_progress(),
    )
    result = run.run()
    if as_json:
        emit_json(result.to_json())
        return
    _print_outcome(result)


def _print_outcome(result) -> None:
    from rich.table import Table

    best_base = min((b["loss"] for b in result.baselines.values()), default=None)
    table = Table(
        title=f"study {result.study}: {result.n_complete} complete trials ({result.n_failed} failed{f', {result.n_pruned} pruned' if result.n_pruned else ''}), budget {result.budget_bytes:,} bytes",
        title_justify="left",
    )
    rows = ([("best found", result.best)] if result.best else []) + sorted(result.baselines.items(), key=lambda kv: kv[1]["loss"])
    tested = any("test_loss" in row for _, row in rows)
    for header in ("plan", "trial", "loss", *(["test loss"] if tested else []), "bytes", "bpw", "loss / best baseline"):
        table.add_column(header, justify="left" if header == "plan" else "right", no_wrap=True)
    for name, row in rows:
        ratio = row["loss"] / best_base if best_base else None
        test = [cell(row.get("test_loss"), ".6g")] if tested else []
        table.add_row(name, str(row["trial"]), f"{row['loss']:.6g}", *test, f"{row['bytes']:,}", f"{row['bpw']:.4g}", cell(ratio, ".3f"))
    wide_console().print(table)
    if result.out_of_time:
        click.echo(f"stopped at the time limit (search.time_limit_s) after {result.n_complete} complete trials; --resume goes on")
    if result.pareto:
        front = Table(title=f"Pareto front: {len(result.pareto)} plans", title_justify="left")
        for header in ("trial", "loss", "bytes", "bpw"):
            front.add_column(header, justify="right")
        for row in result.pareto:
            front.add_row(str(row["trial"]), f"{row['loss']:.6g}", f"{row['bytes']:,}", f"{row['bpw']:.4g}")
        wide_console().print(front)
    if result.unseen and result.searched_unseen:
        click.echo(unseen_warning(result.unseen))
    elif result.unseen and result.pinned_unseen:
        click.echo(f"kept at 16 bits in every plan, the loss cannot see them: {', '.join(result.unseen)} (layers.unseen = \"fp16\")")
    elif result.unseen:
        click.echo(f"left out of the plan, the loss cannot see them: {', '.join(result.unseen)} (at the model's dtype; layers.unseen = \"search\" puts them in)")


@cli.command()
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def studies(storage: str, as_json: bool) -> None:
    """List the studies in the database: trial counts by state and the best trial."""
    from mpsearch.storage import Storage
    from mpsearch.storage.trials import study_rows

    rows = study_rows(Storage(storage, create=False))
    if as_json:
        emit_json({"studies": rows})
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} studies", title_justify="left")
    for header in ("study", "trials", "complete", "running", "failed", "pruned", "best trial", "loss", "bytes", "bpw"):
        table.add_column(header, justify="left" if header == "study" else "right", no_wrap=True)
    for row in rows:
        best, st = row["best"] or {}, row["states"]
        table.add_row(
            row["name"], str(row["n_trials"]), str(st["complete"]), str(st["running"]), str(st["fail"]), str(st["pruned"]),
            cell(best.get("number")), cell(best.get("loss"), ".6g"), cell(best.get("bytes"), ","), cell(best.get("bpw"), ".4g"),
        )
    wide_console().print(table)


@cli.command()
@click.argument("study")
@storage_option
@click.option("--pareto", is_flag=True, help="Only the Pareto front (loss, bytes) of a --pareto study, smallest first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def trials(study: str, storage: str, pareto: bool, as_json: bool) -> None:
    """List the trials of STUDY: number, state, loss, bytes, bpw, duration, source, failure reason."""
    from mpsearch.storage import Storage
    from mpsearch.storage.trials import pareto_rows, trial_rows

    store = Storage(storage, create=False)
    rows = pareto_rows(store, study) if pareto else trial_rows(store, study)
    if as_json:
        emit_json({"study": study, "trials": rows})
        return
    from rich.table import Table

    table = Table(title=f"study {study}: {len(rows)} trials", title_justify="left")
    for header in ("trial", "state", "loss", "bytes", "bpw", "seconds", "source", "error"):
        table.add_column(header, justify="left" if header in ("state", "source", "error") else "right")
    for row in rows:
        table.add_row(
            str(row["number"]), row["state"], cell(row["loss"], ".6g"), cell(row["bytes"], ","), cell(row["bpw"], ".4g"),
            cell(row["duration_s"], ".1f"), row["source"] or "", row["error"] or "",
        )
    wide_console().print(table)


@cli.command()
@click.argument("study")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The folder to write report.html and the PNG figures into (other files there are left alone).")
@click.option("--top", "top_k", type=click.IntRange(min=1, max=1000), default=10, show_default=True, help="How many of the best plans the bit-spread figure compares.")
@storage_option
@click.option("--force", is_flag=True, help="Replace a report already in --out.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a summary.")
def report(study: str, out: str, top_k: int, storage: str, force: bool, as_json: bool) -> None:
    """Write STUDY's report to --out: one self-contained HTML page and its figures as PNG files.

    Loss by trial (best so far, baselines), loss by size (Pareto front, budget), the best plan's
    bits per layer over each layer's sensitivity, the bits of the top plans, and the baselines.
    """
    from mpsearch.report import write_report
    from mpsearch.storage import Storage

    files = write_report(Storage(storage, create=False), study, out, top_k=top_k, force=force)
    if as_json:
        emit_json({"study": study, "out": out, "files": [{"name": n, "bytes": b} for n, b in files]})
        return
    click.echo(f"wrote the report of {study} to {out}: open {out.rstrip('/')}/report.html")
    for name, size in files:
        click.echo(f"  {name:<20} {size:>12,} bytes")


@cli.command()
@click.argument("study")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The folder to write; it must not exist or be empty (or pass --force).")
@click.option("--trial", type=click.IntRange(min=0), default=None, help="Export this trial number (default: the best within the budget).")
@click.option("--pareto-index", type=click.IntRange(min=0), default=None, help="Export the K-th plan of a --pareto study's front, smallest first.")
@storage_option
@click.option("--spec", "spec_path", default=None, type=click.Path(dir_okay=False), help="The spec the study ran with (default: the one stored with the study).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--no-verify", is_flag=True, help="Skip loading the export back and checking its loss against the trial's.")
@click.option(
    "--target", type=click.Choice(TARGETS), default="mpsearch", show_default=True,
    help="Also write this deployment format: compressed-tensors adds a Hugging Face folder that transformers loads.",
)
@click.option(
    "--refine", type=click.Choice(["none", "sequential", "blockwise"]), default=None,
    help="sequential: re-quantize the plan with GPTQ in forward order, each layer from the inputs of the already quantized "
    "layers before it; blockwise: that, then learn each block's rounding and scales against the FP model's block outputs "
    "(export.blockwise_steps a block); kept only if the evaluation loss drops (default: the spec's export.refine, none).",
)
@click.option(
    "--repair", "repair_steps", type=click.IntRange(min=0), default=0, show_default=True,
    help="Tune the scales, norms and biases (codes fixed) for this many Adam steps by distillation on the calibration split "
    "(or on export.repair_examples examples: the calibration split and the next ones of its draw); kept only if the evaluation loss drops.",
)
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a summary.")
def export(study, out, trial, pareto_index, storage, spec_path, force, no_verify, target, refine, repair_steps, device, as_json) -> None:
    """Write a trial of STUDY to --out: packed model.safetensors, plan.json, FORMAT.md and deployment configs.

    The folder is built beside --out and renamed into place once the export has been loaded
    back and its loss checked against the trial's, and it is recorded in the database. With
    --target compressed-tensors, --out/compressed-tensors/ is a Hugging Face model folder whose
    outputs in transformers are checked against mpsearch's loader before anything is kept.
    """
    from mpsearch.export import export_study
    from mpsearch.storage import Storage

    result = export_study(
        Storage(storage, create=False), study, out, trial=trial, pareto_index=pareto_index,
        spec=load_spec(spec_path) if spec_path else None, device=device, force=force, verify=not no_verify, progress=show_progress(), target=target, refine=refine, repair_steps=repair_steps,
    )
    if as_json:
        emit_json(result.to_json())
        return
    checked = "" if result.verified_loss is None else f", loaded back at loss {result.verified_loss:.6g}"
    tested = "" if result.test_loss is None else f", test loss {result.test_loss:.6g}"
    click.echo(f"exported trial {result.trial} of {result.study} to {result.out}: loss {result.loss:.6g}{checked}{tested}, {result.bytes:,} bytes, {result.bpw:.4g} bpw")
    for r in (result.refinement, result.repair):
        if r is None:
            continue
        label = {"sequential-gptq": "sequential gptq", "sequential-gptq+blockwise": f"sequential gptq + block-wise rounding, {r['steps']} steps a block"}.get(r["method"], f"repair, {r['steps']} steps")
        test = "" if r["test_loss_after"] is None else f", test {r['test_loss_before']:.6g} -> {r['test_loss_after']:.6g}"
        verdict = "kept" if r["kept"] else "not kept: the weights before it are written"
        click.echo(f"{label} ({r['seconds']:.0f} s): loss {r['loss_before']:.6g} -> {r['loss_after']:.6g}{test}; {verdict}")
    for name, size, _ in result.files:
        click.echo(f"  {name:<40} {size:>12,} bytes")
    for name, info in result.targets.items():
        if name == "gguf":
            checks = [f"mean cosine {info['embedding']['mean']:.6f} to mpsearch's embeddings"] if info.get("embedding") else []
            checks += [f"perplexity {info['perplexity']['llama_cpp']:.4f} vs mpsearch's {info['perplexity']['mpsearch']:.4f}"] if info.get("perplexity") else []
            ran = f"; llama.cpp ran it: {', '.join(checks)}" if checks else ""
            click.echo(f"gguf: {info['file']}, {len(info['tensors'])} tensors at their planned types{ran}")
            continue
        dense = f", {len(info['dense'])} written dense (see README.md)" if info["dense"] else ""
        vllm = f"; vLLM cannot run {len(info['vllm_problems'])} of its layers (README.md)" if info["vllm_problems"] else ""
        click.echo(f"{name}: {info['folder']}, {info['quantized']} quantized layers{dense}{vllm}")


@cli.command(name="eval")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("spec", type=click.Path(dir_okay=False))
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a line.")
def eval_(folder, spec, device, as_json) -> None:
    """Score the export in FOLDER, loaded from its packed file, on SPEC's evaluation data."""
    from mpsearch.export import evaluate_export
    from mpsearch.workload import Workload

    doc = evaluate_export(folder, Workload(load_spec(spec), device=device))
    if as_json:
        emit_json(doc)
        return
    click.echo(f"{folder}: loss {doc['loss']:.6g} (trial {doc['trial']} recorded {doc['recorded_loss']:.6g}), {doc['bytes']:,} bytes, {doc['bpw']:.4g} bpw")



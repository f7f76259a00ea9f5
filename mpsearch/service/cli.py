"""The ``mpsearch`` command line: a thin layer over the library.

Every command that reports data takes ``--json`` and then prints exactly one JSON
document on stdout. A problem with the input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import math
import sys

import click

from mpsearch.errors import MPSearchError

EXIT_BAD_INPUT = 2


def _load(spec_path: str):
    from mpsearch.spec import Spec

    return Spec.load(spec_path)


def _emit_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mpsearch", prog_name="mpsearch")
def cli() -> None:
    """Find per-layer bit-widths (2, 3, 4, 8 or 16) that fit a memory budget and lose the least.

    Start with `mpsearch layers studies/minilm.toml`.
    """


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--errors", is_flag=True, help="Quantize every layer at every bit-width and add its SQNR (dB) and weight MSE.")
@click.option("--device", default="cpu", show_default=True, help="Where to quantize (cpu, cuda, cuda:1, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def layers(spec: str, errors: bool, device: str, as_json: bool) -> None:
    """List the quantizable layers of SPEC's model, with their bytes at each bit-width.

    Bytes follow DESIGN.md: packed codes plus scales (and zero points), fp16 at 16 bits;
    `other_bytes` is everything else in the model, so bytes(plan) = Σ bytes[l][b] + other_bytes.
    With --errors, each layer's quantization error at each bit-width under the spec's
    method (the candidate bank, cached on disk) is added.
    """
    from mpsearch.workload import Workload

    s = _load(spec)
    workload = Workload(s, device=device)
    table = workload.layer_table()
    budget = s.budget.to_budget()
    limit = table.budget_bytes(budget)
    document = table.to_json()
    document["budget"] = {"spec": str(budget), "bytes": limit, "bpw": (limit - table.other_bytes) * 8 / table.n_weights}
    if errors:
        bank = workload.candidate_bank(progress=not as_json)
        stats = bank.errors()
        for row in document["layers"]:
            per_bits = stats[row["name"]]
            row["sqnr"] = {str(b): _finite(e["sqnr"]) for b, e in per_bits.items()}
            row["mse"] = {str(b): e["mse"] for b, e in per_bits.items()}
            if row["name"] in bank.notes:
                row["note"] = bank.notes[row["name"]]
        document["method"] = s.quant.method
    if as_json:
        _emit_json(document)
        return
    _print_layers(document)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--bits", type=int, required=True, help="The bit-width every layer gets (one of the spec's quant.bits).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None, help="Override the spec's quant.method.")
@click.option("--device", default="cpu", show_default=True, help="Where to quantize and evaluate (cpu, cuda, ...).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a line.")
def quantize(spec: str, bits: int, method: str | None, device: str, as_json: bool) -> None:
    """Quantize every layer of SPEC's model at BITS and score it: the uniform baseline.

    Prints the loss on the evaluation set, the exact bytes and the bpw of the uniform plan.
    """
    from mpsearch.workload import Workload

    s = _load(spec)
    if method is not None:
        s = s.with_overrides(quant={**s.quant.model_dump(), "method": method})
    if bits not in s.quant.bits:
        raise MPSearchError(f"--bits {bits} is not in quant.bits {list(s.quant.bits)}; pick one of those or add it to the spec")
    workload = Workload(s, device=device)
    table = workload.layer_table()
    plan = table.uniform(bits)
    bank = workload.candidate_bank(bits=[bits], progress=not as_json)
    model = workload.build_model()  # a copy: the FP model stays FP for the reference outputs
    loss = workload.loss(bank.apply(model, plan))
    size = table.bytes(plan)
    document = {"bits": bits, "method": s.quant.method, "bytes": size, "bpw": table.bpw(plan), "loss": loss}
    if as_json:
        _emit_json(document)
        return
    click.echo(f"uniform {bits}-bit {document['method']}: loss {document['loss']:.6g}, {size:,} bytes, {document['bpw']:.4g} bpw")


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--method", type=click.Choice(["hessian", "perturbation", "fisher"]), default="hessian", show_default=True)
@click.option("--mode", type=click.Choice(["all", "per-layer"]), default="all", show_default=True, help="hessian: one Hessian-vector product per probe for all layers, or one per layer.")
@click.option("--estimator", type=click.Choice(["auto", "gn", "hvp"]), default="auto", show_default=True, help="hessian, all-at-once: Gauss-Newton output-space probes (exact for distillation losses, no cross-layer noise) or parameter-space Hessian-vector products; auto picks gn for distillation losses.")
@click.option("--tol", type=float, default=None, help="hessian: relative tolerance of the stopping rule (default 0.05).")
@click.option("--max-probes", type=int, default=None, help="hessian: most probes per layer (default 48).")
@click.option("--workers", type=int, default=2, show_default=True, help="perturbation: Ray actors (0: in this process).")
@click.option("--address", default=None, help="perturbation: an existing Ray cluster (default: local Ray).")
@click.option("--storage", default=None, help="Database URL for profiles (default: the spec's storage.url).")
@click.option("--recompute", is_flag=True, help="Compute again even if the database holds this profile.")
@click.option("--device", default="cpu", show_default=True)
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

    s = _load(spec)
    if plot_path is not None:
        from pathlib import Path

        folder = Path(plot_path).resolve().parent
        if not folder.is_dir():
            raise MPSearchError(f"--plot: folder {str(folder)!r} does not exist; create it or pick another path")
    store = Storage(storage or s.storage.url)
    workload = Workload(s, device=device)
    profile = run_analysis(
        workload, method, store, mode=mode, estimator=estimator, tol=tol, max_probes=max_probes, workers=workers, address=address,
        progress=not as_json, recompute=recompute,
    )
    if plot_path is not None:
        plot(profile, plot_path, workload.layer_table().menu)
    if as_json:
        _emit_json(profile.to_json())
        return
    _print_profile(profile, workload.layer_table().menu)


def _print_profile(profile, menu) -> None:
    from rich.table import Table

    bits = [str(b) for b in menu]
    order = {name: i for i, name in enumerate(profile.ranking)}
    rows = sorted(profile.layers, key=lambda r: order[r["name"]])
    has_trace = "trace" in rows[0]
    table = Table(title=f"{profile.method} sensitivity, most sensitive first" + (" (from the database)" if profile.reused else f" ({profile.seconds:.1f} s)"), title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("layer", no_wrap=True)
    if has_trace:
        table.add_column("trace", justify="right")
        if "trace_stderr" in rows[0]:
            table.add_column("± stderr", justify="right")
    for b in bits:
        table.add_column(f"{b}-bit", justify="right")
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["name"]]
        if has_trace:
            cells.append(f"{row['trace']:.4g}")
            if "trace_stderr" in row:
                cells.append(_cell(row["trace_stderr"], ".2g"))
        cells += [f"{row['score'][b]:.3g}" for b in bits]
        table.add_row(*cells)
    _wide_console(170).print(table)


# -- storage -------------------------------------------------------------------------------

STORAGE_ENV = "MPSEARCH_STORAGE"


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Complete trials the study ends with, baselines included (default: the spec's search.trials).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Ray actors scoring plans; 0 scores in this process (default: the spec's search.workers).")
@click.option("--budget", default=None, help="Overrides the spec's budget: bytes (5000000), MiB (5.2MiB) or bpw (4.0bpw).")
@click.option("--storage", envvar=STORAGE_ENV, default=None, help=f"Database URL (default: the spec's storage.url, or ${STORAGE_ENV}).")
@click.option("--study", "study_name", default=None, help="Study name (default: SPEC's name and budget, e.g. minilm-4bpw).")
@click.option("--address", default=None, help="An existing Ray cluster, HOST:PORT of its head (default: a local Ray).")
@click.option("--resume", is_flag=True, help="Continue the study if it exists: keep its complete trials, re-run those a dead driver left running.")
@click.option("--pareto", is_flag=True, help="Two objectives, (loss, bytes): the whole front up to the budget in one study.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def search(spec, trials, workers, budget, storage, study_name, address, resume, pareto, device, as_json) -> None:
    """Search per-layer bit-widths for SPEC under its budget: an Optuna study scored on Ray.

    Warm starts (ILP on the Hessian and perturbation scores, greedy, every uniform plan that
    fits) run first and are reported as the baselines next to the best plan found.
    """
    from mpsearch.search.driver import Search
    from mpsearch.storage import Storage
    from mpsearch.workload import Workload

    s = _load(spec)
    if budget is not None:
        s = s.with_overrides(budget=budget)
    store = Storage(storage or s.storage.url)
    workload = Workload(s, device=device)
    run = Search(workload, store, study=study_name, trials=trials, workers=workers, address=address, resume=resume, pareto=pareto, progress=not as_json, trial_timeout_s=s.search.trial_timeout_s)
    result = run.run()
    if as_json:
        _emit_json(result.to_json())
        return
    _print_outcome(result)


def _print_outcome(result) -> None:
    from rich.table import Table

    best_base = min((b["loss"] for b in result.baselines.values()), default=None)
    table = Table(
        title=f"study {result.study}: {result.n_complete} complete trials ({result.n_failed} failed), budget {result.budget_bytes:,} bytes",
        title_justify="left",
    )
    for header in ("plan", "trial", "loss", "bytes", "bpw", "loss / best baseline"):
        table.add_column(header, justify="left" if header == "plan" else "right", no_wrap=True)
    rows = ([("best found", result.best)] if result.best else []) + sorted(result.baselines.items(), key=lambda kv: kv[1]["loss"])
    for name, row in rows:
        ratio = row["loss"] / best_base if best_base else None
        table.add_row(name, str(row["trial"]), f"{row['loss']:.6g}", f"{row['bytes']:,}", f"{row['bpw']:.4g}", _cell(ratio, ".3f"))
    _wide_console().print(table)
    if result.pareto:
        front = Table(title=f"Pareto front: {len(result.pareto)} plans", title_justify="left")
        for header in ("trial", "loss", "bytes", "bpw"):
            front.add_column(header, justify="right")
        for row in result.pareto:
            front.add_row(str(row["trial"]), f"{row['loss']:.6g}", f"{row['bytes']:,}", f"{row['bpw']:.4g}")
        _wide_console().print(front)


def storage_option(fn):
    return click.option(
        "--storage",
        envvar=STORAGE_ENV,
        default="sqlite:///mpsearch.db",
        show_default=True,
        help=f"Database URL: sqlite:///FILE.db or postgresql+psycopg://USER@HOST:PORT/DB (or ${STORAGE_ENV}).",
    )(fn)


@cli.command()
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def studies(storage: str, as_json: bool) -> None:
    """List the studies in the database: trial counts by state and the best trial."""
    from mpsearch.storage import Storage
    from mpsearch.storage.studies import study_rows

    rows = study_rows(Storage(storage, create=False))
    if as_json:
        _emit_json({"studies": rows})
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} studies", title_justify="left")
    for header in ("study", "trials", "complete", "running", "failed", "pruned", "best trial", "loss", "bytes", "bpw"):
        table.add_column(header, justify="left" if header == "study" else "right", no_wrap=True)
    for row in rows:
        best, st = row["best"] or {}, row["states"]
        table.add_row(
            row["name"], str(row["n_trials"]), str(st["complete"]), str(st["running"]), str(st["fail"]), str(st["pruned"]),
            _cell(best.get("number")), _cell(best.get("loss"), ".6g"), _cell(best.get("bytes"), ","), _cell(best.get("bpw"), ".4g"),
        )
    _wide_console().print(table)


@cli.command()
@click.argument("study")
@storage_option
@click.option("--pareto", is_flag=True, help="Only the Pareto front (loss, bytes) of a --pareto study, smallest first.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def trials(study: str, storage: str, pareto: bool, as_json: bool) -> None:
    """List the trials of STUDY: number, state, loss, bytes, bpw, duration, source, failure reason."""
    from mpsearch.storage import Storage
    from mpsearch.storage.studies import pareto_rows, trial_rows

    store = Storage(storage, create=False)
    rows = pareto_rows(store, study) if pareto else trial_rows(store, study)
    if as_json:
        _emit_json({"study": study, "trials": rows})
        return
    from rich.table import Table

    table = Table(title=f"study {study}: {len(rows)} trials", title_justify="left")
    for header in ("trial", "state", "loss", "bytes", "bpw", "seconds", "source", "error"):
        table.add_column(header, justify="left" if header in ("state", "source", "error") else "right")
    for row in rows:
        table.add_row(
            str(row["number"]), row["state"], _cell(row["loss"], ".6g"), _cell(row["bytes"], ","), _cell(row["bpw"], ".4g"),
            _cell(row["duration_s"], ".1f"), row["source"] or "", row["error"] or "",
        )
    _wide_console().print(table)


# -- export --------------------------------------------------------------------------------


@cli.command()
@click.argument("study")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="The folder to write; it must not exist or be empty (or pass --force).")
@click.option("--trial", type=click.IntRange(min=0), default=None, help="Export this trial number (default: the best within the budget).")
@click.option("--pareto-index", type=click.IntRange(min=0), default=None, help="Export the K-th plan of a --pareto study's front, smallest first.")
@storage_option
@click.option("--spec", "spec_path", default=None, type=click.Path(dir_okay=False), help="The spec the study ran with (default: the one stored with the study).")
@click.option("--force", is_flag=True, help="Replace --out if it exists and is not empty.")
@click.option("--no-verify", is_flag=True, help="Skip loading the export back and checking its loss against the trial's.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a summary.")
def export(study, out, trial, pareto_index, storage, spec_path, force, no_verify, device, as_json) -> None:
    """Write a trial of STUDY to --out: packed model.safetensors, plan.json, FORMAT.md and deployment configs.

    The folder is built beside --out and renamed into place once the export has been loaded
    back and its loss checked against the trial's, and it is recorded in the database.
    """
    from mpsearch.export import export_study
    from mpsearch.storage import Storage

    result = export_study(
        Storage(storage, create=False), study, out, trial=trial, pareto_index=pareto_index,
        spec=_load(spec_path) if spec_path else None, device=device, force=force, verify=not no_verify, progress=not as_json,
    )
    if as_json:
        _emit_json(result.to_json())
        return
    checked = "" if result.verified_loss is None else f", loaded back at loss {result.verified_loss:.6g}"
    click.echo(f"exported trial {result.trial} of {result.study} to {result.out}: loss {result.loss:.6g}{checked}, {result.bytes:,} bytes, {result.bpw:.4g} bpw")
    for name, size, _ in result.files:
        click.echo(f"  {name:<30} {size:>12,} bytes")


@cli.command(name="eval")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a line.")
def eval_(folder, spec, device, as_json) -> None:
    """Score the export in FOLDER, loaded from its packed file, on SPEC's evaluation data."""
    from mpsearch.export import evaluate_export
    from mpsearch.workload import Workload

    doc = evaluate_export(folder, Workload(_load(spec), device=device))
    if as_json:
        _emit_json(doc)
        return
    click.echo(f"{folder}: loss {doc['loss']:.6g} (trial {doc['trial']} recorded {doc['recorded_loss']:.6g}), {doc['bytes']:,} bytes, {doc['bpw']:.4g} bpw")


# -- jobs ----------------------------------------------------------------------------------


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--address", required=True, help="The Ray head's dashboard URL, http://HEAD:8265 (its Jobs API).")
@click.option("--storage", envvar=STORAGE_ENV, default=None, help="A PostgreSQL URL every node can reach (default: the spec's storage.url, or $MPSEARCH_STORAGE).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Ray actors scoring plans (default: the spec's search.workers).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Complete trials the study ends with (default: the spec's search.trials).")
@click.option("--budget", default=None, help="Overrides the spec's budget.")
@click.option("--study", "study_name", default=None, help="Study name (default: SPEC's name and budget).")
@click.option("--export", "export_dir", default=None, help="After the search, export the best plan to this folder (a path on the cluster).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def submit(spec, address, storage, workers, trials, budget, study_name, export_dir, as_json) -> None:
    """Run the whole search for SPEC (sensitivity, search, optional export) as a Ray job on a cluster.

    The job takes SPEC's folder as its working directory; its state is kept in the database
    (`mpsearch jobs`).
    """
    from pathlib import Path

    from mpsearch.service.jobs import JobArgs, check_cluster_storage, jobs_client, submit as submit_job
    from mpsearch.storage import Storage

    s = _load(spec)
    url = storage or s.storage.url
    check_cluster_storage(url)
    jobs_client(address)  # a wrong or unreachable head is refused before anything is recorded
    store = Storage(url)
    path = Path(spec)
    job_id = submit_job(
        store, s, path.read_text(encoding="utf-8"), JobArgs(trials=trials, workers=workers, budget=budget, study=study_name, export_dir=export_dir),
        address=address, spec_file=path.resolve(),
    )
    job = store.job(job_id)
    if as_json:
        _emit_json(job.to_json())
        return
    click.echo(f"job {job.id} ({job.study}) submitted to {address} as Ray job {job.ray_job_id}; follow it with `mpsearch jobs`")


@cli.group(invoke_without_command=True)
@storage_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
@click.pass_context
def jobs(ctx, storage: str, as_json: bool) -> None:
    """List submitted jobs and their states, brought up to date from Ray (`jobs logs ID`, `jobs cancel ID`)."""
    ctx.obj = storage
    if ctx.invoked_subcommand is not None:
        return
    from mpsearch.service.jobs import sync
    from mpsearch.storage import Storage

    store = Storage(storage, create=False)
    rows = [sync(store, job.id).to_json() for job in store.jobs()]
    if as_json:
        _emit_json({"jobs": rows})
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} jobs", title_justify="left")
    for header in ("job", "study", "state", "created", "finished", "ray job", "error"):
        table.add_column(header, no_wrap=header != "error")
    for row in rows:
        table.add_row(row["id"], row["study"], row["state"], _cell(row["created_at"]), _cell(row["finished_at"]), _cell(row["ray_job_id"]), _cell(row["error"]))
    _wide_console().print(table)


def _job_storage(fn):
    """``--storage`` after the subcommand too (`mpsearch jobs logs ID --storage URL`), else the group's."""
    return click.option("--storage", "storage_here", default=None, help="Database URL (default: the one given to `jobs`, or $MPSEARCH_STORAGE).")(fn)


@jobs.command(name="logs")
@click.argument("job_id")
@_job_storage
@click.pass_obj
def jobs_logs(storage: str, job_id: str, storage_here: str | None) -> None:
    """Print the output of job JOB_ID so far."""
    from mpsearch.service.jobs import logs
    from mpsearch.storage import Storage

    click.echo(logs(Storage(storage_here or storage, create=False), job_id), nl=False)


@jobs.command(name="cancel")
@click.argument("job_id")
@_job_storage
@click.pass_obj
def jobs_cancel(storage: str, job_id: str, storage_here: str | None) -> None:
    """Stop job JOB_ID; the trials it completed stay in its study."""
    from mpsearch.service.jobs import cancel
    from mpsearch.storage import Storage

    job = cancel(Storage(storage_here or storage, create=False), job_id)
    click.echo(f"job {job.id}: stop requested ({job.state}); `mpsearch jobs` shows when it has stopped")


@cli.command(name="job-run", hidden=True)
@click.argument("job_id")
@click.option("--spec", "spec_file", default=None, type=click.Path(dir_okay=False))
@storage_option
def job_run(job_id: str, spec_file: str | None, storage: str) -> None:
    """Run submitted job JOB_ID here (the entrypoint of a Ray job, or the API's local process)."""
    from mpsearch.service.runner import run_job
    from mpsearch.storage import Storage

    code = run_job(Storage(storage, create=False), job_id, spec_file)
    if code:
        sys.exit(code)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to bind; anything but loopback exposes the API to the network.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@storage_option
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), help="A file holding the bearer token (default: $MPSEARCH_API_TOKEN).")
@click.option("--ray-address", default=None, help="Submit jobs to this cluster's Jobs API (http://HEAD:8265); default: local processes with a local Ray.")
@click.option("--root", default=".", show_default=True, type=click.Path(file_okay=False), help="Specs' relative paths start here, and hf: models and data files must lie under it.")
@click.option("--export-root", default="exports", show_default=True, type=click.Path(file_okay=False), help="Where exports are written and served from.")
@click.option("--allow-python", is_flag=True, help="Accept specs whose model or loss is python: code, which runs on the server.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True, help="Larger request bodies get 413.")
def serve(host, port, storage, token_file, ray_address, root, export_root, allow_python, max_body_bytes) -> None:
    """Serve the HTTP API (OpenAPI schema at /openapi.json): jobs, studies, trials, exports."""
    from pathlib import Path

    import uvicorn

    from mpsearch.service.api import ApiSettings, create_app, read_token
    from mpsearch.service.jobs import check_cluster_storage

    token = read_token(token_file)
    if ray_address:
        check_cluster_storage(storage)
    export_path = Path(export_root).resolve()
    export_path.mkdir(parents=True, exist_ok=True)
    settings = ApiSettings(
        storage_url=storage, token=token, root=Path(root).resolve(), export_root=export_path, ray_address=ray_address,
        allow_python=allow_python, max_body_bytes=max_body_bytes,
    )
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")


@cli.group()
def db() -> None:
    """Manage the database schema."""


@db.command()
@storage_option
def upgrade(storage: str) -> None:
    """Create or upgrade mpsearch's tables (and Optuna's) in the database at --storage."""
    from mpsearch.storage import Storage

    store = Storage(storage, check_schema=False)
    before, after = store.upgrade()
    where = store.url.render_as_string(hide_password=True)
    if before == after:
        click.echo(f"{where}: already at mpsearch schema {after}")
    else:
        click.echo(f"{where}: mpsearch schema {before or '(none)'} -> {after}")


def _wide_console(width: int = 150):
    from rich.console import Console

    console = Console()
    console.width = max(console.width, width)  # tables stay whole in a pipe too
    return console


def _cell(value, fmt: str = "") -> str:
    return "" if value is None else format(value, fmt)


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
    for row in doc["layers"]:
        name = row["name"] + (f"  ({row['rule']})" if row.get("rule") else "")
        cells = [f"{row['bytes'][b]:,}" for b in menu]
        if with_errors:
            cells += [_db(row["sqnr"][b]) for b in menu]
        table.add_row(name, row["kind"], "×".join(map(str, row["shape"])), f"{row['n']:,}", *cells)
    console = Console()
    console.width = max(console.width, 210 if with_errors else 150)  # a layer table is wide; let it be, even in a pipe
    console.print(table)
    for item in doc["excluded"]:
        console.print(f"not quantized: {item['name']} — {item['reason']}")
    for row in doc["layers"]:
        if "note" in row:
            console.print(f"{row['name']}: {row['note']}")
    if with_errors:
        console.print(f"dB: signal-to-quantization-noise ratio of each layer's weight under {doc['method']}")
    console.print(f"other tensors: {doc['other_bytes']:,} bytes")
    console.print("whole model, uniform: " + ", ".join(f"{b}-bit {doc['total_bytes'][b]:,} B" for b in menu))
    b = doc["budget"]
    console.print(f"budget {b['spec']}: {b['bytes']:,} bytes ({b['bpw']:.4g} bpw over the quantizable layers)")


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: an exact candidate has no noise


def _db(x: float | None) -> str:
    return "exact" if x is None else f"{x:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="mpsearch", standalone_mode=False)
    except MPSearchError as e:
        click.echo(f"mpsearch: error: {e}", err=True)
        return EXIT_BAD_INPUT
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return EXIT_BAD_INPUT
    except click.ClickException as e:
        hint = f"; see `{e.ctx.command_path} --help`" if getattr(e, "ctx", None) else ""
        click.echo(f"mpsearch: error: {e.format_message().rstrip('.')}{hint}", err=True)
        return EXIT_BAD_INPUT
    except (click.Abort, KeyboardInterrupt):
        click.echo("mpsearch: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

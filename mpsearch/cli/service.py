"""Commands of the service: `submit`, `jobs`, `serve`, `db upgrade` (and the hidden `job-run`)."""

from __future__ import annotations

import sys

import click

from mpsearch.cli import cli
from mpsearch.cli._common import STORAGE_ENV, cell, emit_json, load_spec, storage_option, wide_console


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--address", required=True, help="The Ray head's dashboard URL, http://HEAD:8265 (its Jobs API).")
@click.option("--storage", envvar=STORAGE_ENV, default=None, help="A PostgreSQL URL every node can reach (default: the spec's storage.url, or $MPSEARCH_STORAGE).")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Ray actors scoring plans (default: the spec's search.workers).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Complete trials the study ends with (default: the spec's search.trials).")
@click.option(
    "--time-limit", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
    help="Start no trial after this many seconds of trials, as `search --time-limit` (default: the spec's search.time_limit_s).",
)
@click.option("--budget", default=None, help="Overrides the spec's budget.")
@click.option("--study", "study_name", default=None, help="Study name (default: SPEC's name and budget).")
@click.option("--export", "export_dir", default=None, help="After the search, export the best plan to this folder (a path on the cluster).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def submit(spec, address, storage, workers, trials, time_limit, budget, study_name, export_dir, as_json) -> None:
    """Run the whole search for SPEC (sensitivity, search, optional export) as a Ray job on a cluster.

    The job takes SPEC's folder as its working directory; its state is kept in the database
    (`mpsearch jobs`).
    """
    from pathlib import Path

    from mpsearch.service.jobs import JobArgs, check_cluster_storage, jobs_client, submit as submit_job
    from mpsearch.storage import Storage

    s = load_spec(spec)
    url = storage or s.storage.url
    check_cluster_storage(url)
    jobs_client(address)  # a wrong or unreachable head is refused before anything is recorded
    store = Storage(url)
    path = Path(spec)
    job_id = submit_job(
        store, s, path.read_text(encoding="utf-8"), JobArgs(trials=trials, workers=workers, time_limit_s=time_limit, budget=budget, study=study_name, export_dir=export_dir),
        address=address, spec_file=path.resolve(),
    )
    job = store.job(job_id)
    if as_json:
        emit_json(job.to_json())
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
    from mpsearch.service.jobs import job_kind, sync
    from mpsearch.storage import Storage

    store = Storage(storage, create=False)
    rows = [{**job.to_json(), "kind": job_kind(job)} for job in (sync(store, j.id) for j in store.jobs())]
    if as_json:
        emit_json({"jobs": rows})
        return
    from rich.table import Table

    table = Table(title=f"{len(rows)} jobs", title_justify="left")
    for header in ("job", "kind", "study", "state", "created", "finished", "ray job", "error"):
        table.add_column(header, no_wrap=header != "error")
    for row in rows:
        table.add_row(row["id"], row["kind"], row["study"], row["state"], cell(row["created_at"]), cell(row["finished_at"]), cell(row["ray_job_id"]), cell(row["error"]))
    wide_console().print(table)


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
@click.option("--max-jobs", type=click.IntRange(min=1), default=4, show_default=True, help="Search jobs queued or running at once; more get 429.")
@click.option("--max-exports", type=click.IntRange(min=1), default=1, show_default=True, help="Export jobs queued or running at once; more get 429.")
def serve(host, port, storage, token_file, ray_address, root, export_root, allow_python, max_body_bytes, max_jobs, max_exports) -> None:
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
        allow_python=allow_python, max_body_bytes=max_body_bytes, max_jobs=max_jobs, max_exports=max_exports,
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



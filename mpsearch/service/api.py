"""The HTTP API (``mpsearch serve``): submit searches, read studies, pull exports.

A FastAPI app over the same pieces as the CLI; its OpenAPI schema is at ``/openapi.json``.

Security, by rule:

* every endpoint but ``GET /health`` needs ``Authorization: Bearer TOKEN``. The token comes
  from ``$MPSEARCH_API_TOKEN`` or ``--token-file``; there is no default, and without one the
  server does not start;
* a spec whose model (or tokenizer, or loss) is ``python:`` code is refused unless the
  server was started with ``--allow-python``: those sources execute code on the server;
* ``hf:`` model paths and data files must lie under the server's ``--root``;
* a job always writes to the server's own database, whatever its spec says;
* export downloads serve only the files an export recorded, from inside ``--export-root``;
* request bodies above ``--max-body-bytes`` get 413; the server binds to 127.0.0.1 unless
  told otherwise.

Bad input is a 4xx with ``{"detail": "one line that says what to do"}``, never a traceback.
"""

# No `from __future__ import annotations`: FastAPI reads these signatures at run time, closures included.
import hmac
import os
import re
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from mpsearch.errors import MPSearchError, NotFoundError
from mpsearch.spec import MAX_TRIALS
from mpsearch.storage.lease import StudyBusy

TOKEN_ENV = "MPSEARCH_API_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class ApiSettings:
    storage_url: str
    token: str
    root: Path
    export_root: Path
    ray_address: str | None = None
    allow_python: bool = False
    max_body_bytes: int = 1 << 20
    max_jobs: int = 4  # search jobs queued or running at once on this server's database; more get 429
    max_exports: int = 1  # export jobs queued or running at once; more get 429

    @property
    def log_root(self) -> Path:
        """Where local jobs write their logs: a folder of the export root."""
        return self.export_root / "job-logs"


def read_token(token_file: str | None) -> str:
    """The API token from ``--token-file`` or ``$MPSEARCH_API_TOKEN``; refusing to run without one."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise MPSearchError(f"--token-file {token_file!r} cannot be read ({e.strerror}); give a file holding the API token") from None
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise MPSearchError(f"no API token: set ${TOKEN_ENV} or pass --token-file FILE; the server never runs without one")
    if len(token) < MIN_TOKEN_LENGTH:
        raise MPSearchError(f"the API token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} (for example `openssl rand -hex 32`)")
    return token


# -- request and response bodies ---------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobRequest(_Body):
    spec: str = Field(description="The study spec, as TOML text", max_length=200_000)
    trials: int | None = Field(None, ge=1, le=MAX_TRIALS)
    workers: int | None = Field(None, ge=0, le=1024)
    time_limit_s: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="Start no trial after this many seconds of trials (default: the spec's search.time_limit_s)",
    )
    budget: str | None = Field(None, max_length=64, description="Overrides the spec's budget: 5000000, 5.2MiB or 4.0bpw")
    study: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._@+-]+$")
    export: bool = Field(False, description="Export the best plan when the search ends")


class ExportRequest(_Body):
    trial: int | None = Field(None, ge=0, le=10_000_000)
    pareto_index: int | None = Field(None, ge=0, le=100_000)


class Job(BaseModel):
    id: str
    study: str
    state: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    host: str | None
    ray_job_id: str | None
    kind: str = Field("search", description="search, or export (POST /studies/{name}/export)")
    result: dict[str, Any] | None = Field(None, description="A succeeded job's result: the search's summary, the export's files with their download URLs")


class Detail(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Detail} for code in (400, 401, 404, 413, 422)}


def public_job(storage, job, settings: "ApiSettings") -> "Job":
    """A job as the API shows it: no process id or log path of a local job (the logs endpoint
    serves the log), its error without the server's paths or database URL, and an export's
    files as download URLs (never the folder they are in)."""
    from mpsearch.service.jobs import job_kind, result

    doc = job.to_json()
    if (doc.get("ray_job_id") or "").startswith("local:"):
        doc["ray_job_id"] = None
    if doc.get("error"):
        doc["error"] = public_message(doc["error"], settings)
    done = result(storage, job)
    if done is not None:
        for export in (done, done.get("export")):
            if isinstance(export, dict) and "export_id" in export:
                export.pop("out", None)
                export["files"] = [{**f, "url": f"/exports/{export['export_id']}/files/{f['name']}"} for f in export.get("files", [])]
    return Job(**doc, kind=job_kind(job), result=done)


# -- the app -------------------------------------------------------------------------------------


def create_app(settings: ApiSettings) -> FastAPI:
    """The app: error handlers, the body limit, ``/health``, and the routes, all behind the token but ``/health``."""
    from mpsearch.storage import Storage

    # The schema is served behind the token like everything else (no /docs page: a browser could
    # not send the token); `curl -H "Authorization: Bearer $TOKEN" .../openapi.json` reads it.
    app = FastAPI(
        title="mpsearch",
        version=_version(),
        description="Sensitivity-driven mixed-precision quantization search: jobs, studies and exports.",
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    storage = Storage(settings.storage_url)
    _error_handlers(app, settings)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    auth = [Depends(_authorized(settings.token))]

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()
    for routes in (_job_routes(storage, settings), _study_routes(storage), _export_routes(storage, settings)):
        app.include_router(routes, dependencies=auth, responses=ERRORS)
    return app


def _authorized(token: str):
    bearer = HTTPBearer(auto_error=False, description=f"The token the server was started with (${TOKEN_ENV} or --token-file)")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorized


def _error_handlers(app: FastAPI, settings: ApiSettings) -> None:
    from fastapi.exceptions import RequestValidationError

    from mpsearch.errors import StorageError

    def said(e: Exception) -> str:
        return public_message(str(e), settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg')}" if where else str(first.get("msg"))}, status_code=422)

    @app.exception_handler(StorageError)
    async def database(request: Request, e: StorageError):
        return JSONResponse({"detail": "the server's database is unavailable or refused the operation; try again later"}, status_code=503)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, e: NotFoundError):
        return JSONResponse({"detail": said(e)}, status_code=404)

    @app.exception_handler(StudyBusy)
    async def busy(request: Request, e: StudyBusy):
        return JSONResponse({"detail": said(e)}, status_code=409)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, e: Forbidden):
        return JSONResponse({"detail": said(e)}, status_code=403)

    @app.exception_handler(Busy)
    async def busy_server(request: Request, e: Busy):
        return JSONResponse({"detail": said(e)}, status_code=429, headers={"Retry-After": "30"})

    @app.exception_handler(MPSearchError)
    async def bad_input(request: Request, e: MPSearchError):
        return JSONResponse({"detail": said(e)}, status_code=400)


def public_message(text: str, settings: ApiSettings) -> str:
    """``text`` without the server's folders, database URL or host: what a client may read."""
    from mpsearch.storage.database import parse_url, where

    url = parse_url(settings.storage_url)
    for secret, shown in (
        (url.render_as_string(hide_password=False), "the database"),
        (url.render_as_string(hide_password=True), "the database"),
        (where(url), "the database"),
        (str(settings.export_root) + "/", ""),
        (str(settings.export_root), "the export root"),
        (str(settings.root) + "/", ""),
        (str(settings.root), "the server's root"),
    ):
        text = text.replace(secret, shown)
    return re.sub(r"(?<![\w.])/(?:[\w.@+-]+/)+[\w.@+-]*", "<path>", text)  # any other absolute path


def _job_routes(storage, settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["jobs"])

    @router.post("/jobs", status_code=201, responses={403: {"model": Detail}, 409: {"model": Detail}})
    def submit_job(body: JobRequest) -> Job:
        """Submit a whole search (sensitivity, search, optional export) for the spec."""
        from mpsearch.service.jobs import JobArgs, submit

        spec = checked_spec(body.spec, settings)
        _check_room(storage, "search", settings.max_jobs)
        export_dir = str(settings.export_root / f"job-{uuid.uuid4().hex[:12]}") if body.export else None
        args = JobArgs(trials=body.trials, workers=body.workers, time_limit_s=body.time_limit_s, budget=body.budget, study=body.study, export_dir=export_dir)
        job_id = submit(storage, spec, body.spec, args, address=settings.ray_address, log_dir=settings.log_root)
        return public_job(storage, storage.job(job_id), settings)

    @router.get("/jobs")
    def list_jobs(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[Job]:
        from mpsearch.service.jobs import sync

        return [public_job(storage, sync(storage, job.id), settings) for job in storage.jobs(limit=limit)]

    @router.get("/jobs/{job_id}")
    def get_job(job_id: Annotated[str, PathParam(max_length=64)]) -> Job:
        from mpsearch.service.jobs import sync

        return public_job(storage, sync(storage, job_id), settings)

    @router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
    def job_logs(job_id: Annotated[str, PathParam(max_length=64)]) -> str:
        """The job's output so far (its driver's stdout and stderr)."""
        from mpsearch.service.jobs import logs

        return logs(storage, job_id)

    @router.post("/jobs/{job_id}/cancel", status_code=202)
    def cancel_job(job_id: Annotated[str, PathParam(max_length=64)]) -> Job:
        from mpsearch.service.jobs import cancel

        return public_job(storage, cancel(storage, job_id), settings)

    return router


def _study_routes(storage) -> APIRouter:
    router = APIRouter(tags=["studies"])

    @router.get("/studies")
    def studies() -> list[dict[str, Any]]:
        from mpsearch.storage.trials import study_rows

        return study_rows(storage)

    @router.get("/studies/{name}/trials")
    def trials(name: str) -> list[dict[str, Any]]:
        from mpsearch.storage.trials import trial_rows

        return trial_rows(storage, name)

    @router.get("/studies/{name}/best")
    def best(name: str) -> dict[str, Any]:
        """The best plan within the study's budget next to its baselines (the plan as a versioned Plan document)."""
        from mpsearch.storage.trials import TrialLog

        result = TrialLog.open(storage, name).outcome()
        if result.best is None:
            raise NotFoundError(f"study {name!r} has no completed trial within its budget yet")
        return result.to_json()

    @router.get("/studies/{name}/pareto")
    def pareto(name: str) -> list[dict[str, Any]]:
        from mpsearch.storage.trials import pareto_rows

        return pareto_rows(storage, name)

    @router.get("/studies/{name}/report", response_class=HTMLResponse, responses={404: {"model": Detail}})
    def report(name: str, top: Annotated[int, Query(ge=1, le=1000)] = 10) -> HTMLResponse:
        """The study's report, the page `mpsearch report` writes: one self-contained HTML page
        with its figures embedded (loss by trial, loss by size, the best plan over the layers'
        sensitivity, the bits of the ``top`` best plans) and the baselines."""
        from mpsearch.report import report_html

        return HTMLResponse(report_html(storage, name, top_k=top))

    return router


def _export_routes(storage, settings: ApiSettings) -> APIRouter:
    router = APIRouter(tags=["exports"])

    @router.post("/studies/{name}/export", status_code=202, responses={403: {"model": Detail}, 404: {"model": Detail}, 429: {"model": Detail}})
    def export(name: str, body: ExportRequest) -> Job:
        """Start an export job for a trial of the study (the best by default), written under the
        server's export root. Poll ``GET /jobs/{id}``: once it has succeeded, its ``result``
        lists the files with their download URLs."""
        from mpsearch.service.jobs import submit_export
        from mpsearch.storage.trials import TrialLog

        meta = TrialLog.open(storage, name).meta  # a 404 for a study that does not exist
        base_dir = Path(meta.get("base_dir") or settings.root)
        if isinstance(meta.get("spec"), dict):  # the spec the export rebuilds obeys the rules a submitted one does
            check_rules(meta["spec"], settings, base_dir)
        _check_room(storage, "export", settings.max_exports)
        out = settings.export_root / f"export-{uuid.uuid4().hex[:12]}"
        cwd = base_dir if base_dir.is_dir() else settings.root
        job_id = submit_export(storage, name, out, trial=body.trial, pareto_index=body.pareto_index, base_dir=cwd, log_dir=settings.log_root)
        return public_job(storage, storage.job(job_id), settings)

    @router.get("/exports/{export_id}/files/{file:path}", response_class=FileResponse)
    def download(export_id: Annotated[int, PathParam(ge=1, le=2**31 - 1)], file: str):  # ids are 32-bit in the database
        return FileResponse(export_file(storage, settings, export_id, file), filename=file)

    return router


def export_file(storage, settings: ApiSettings, export_id: int, name: str) -> Path:
    """The path of file ``name`` of export ``export_id``: one it recorded, inside the export root."""
    record = storage.export(export_id)
    if name not in {f.path for f in record.files}:
        raise MPSearchError(f"{name!r} is not a file of export {export_id}; it has {', '.join(sorted(f.path for f in record.files))}")
    root = settings.export_root.resolve()
    path = (Path(record.out_dir) / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFoundError(f"export {export_id}'s {name} is not under this server's export root (or was removed)")
    return path


def checked_spec(text: str, settings: ApiSettings):
    """The spec in ``text``, once the server's rules allow it; paths resolve under ``settings.root``."""
    from mpsearch.spec import Spec

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MPSearchError(f"spec is not valid TOML: {e}; fix the syntax at that line") from None
    except RecursionError:
        raise MPSearchError("spec nests arrays or tables too deeply to read; a study spec is a few flat tables") from None
    if not isinstance(raw, dict):
        raise MPSearchError("spec must be a TOML document")
    check_rules(raw, settings, settings.root)
    return Spec.from_dict(raw, base_dir=settings.root)


def check_rules(raw: dict, settings: ApiSettings, base_dir: Path) -> None:
    """Refuse (403) a spec that would run Python code on a server without ``--allow-python``, or
    read a path outside ``--root`` (relative paths resolve from ``base_dir``)."""
    from mpsearch.workload.data import BUILT_IN

    model, loss, data = (raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("model", "loss", "data"))
    code = [f"{where} = {v!r}" for where, v in (("model.source", model.get("source")), ("model.tokenizer", model.get("tokenizer"))) if isinstance(v, str) and v.startswith("python:")]
    if loss.get("kind") == "callable" or loss.get("callable"):
        code.append("loss.kind = 'callable'")
    if code and not settings.allow_python:
        raise Forbidden(f"{code[0]} runs Python code on the server, which this server refuses; start it with --allow-python to permit that")
    root = settings.root.resolve()
    paths = [(f, v[3:]) for f, v in (("model.source", model.get("source")), ("model.tokenizer", model.get("tokenizer"))) if isinstance(v, str) and v.startswith("hf:")]
    paths += [(f, v) for f, v in (("data.source", data.get("source")), ("data.eval_source", data.get("eval_source"))) if isinstance(v, str) and v not in BUILT_IN]
    for field, value in paths:
        resolved = (base_dir / Path(value).expanduser()).resolve()
        if not resolved.is_relative_to(root):
            raise Forbidden(f"{field}: {value!r} is outside this server's root; give a path under it (relative paths start there)")


class Forbidden(MPSearchError):
    """Refused by the server's rules (a 403)."""


class Busy(MPSearchError):
    """The server is at its limit of concurrent jobs or exports (a 429)."""


def _check_room(storage, kind: str, limit: int) -> None:
    """A :class:`Busy` (429) when ``limit`` jobs of ``kind`` are already queued or running."""
    from mpsearch.service.jobs import active_jobs

    active = active_jobs(storage, kind)
    if len(active) >= limit:
        raise Busy(f"{len(active)} {kind} job(s) already queued or running, this server's limit; try again when one ends (GET /jobs)")


class BodyLimit:
    """413 for a request body above ``limit`` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(send, self.limit)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(send, self.limit)


class _TooLarge(BaseException):
    """Raised from the body stream; a BaseException, so that FastAPI's body parsing (which turns
    any Exception into a 400) lets it through to :class:`BodyLimit`, which answers 413."""


async def _too_large(send, limit: int) -> None:
    body = ('{"detail": "request body is over %d bytes; send a smaller spec"}' % limit).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _version() -> str:
    from mpsearch import __version__

    return __version__

"""What the commands share: options read from the environment, registry-backed choices, output."""

from __future__ import annotations

import importlib
import json
import math

import click

STORAGE_ENV = "MPSEARCH_STORAGE"
DEFAULT_STORAGE = "sqlite:///mpsearch.db"


class RegistryChoice(click.Choice):
    """A ``click.Choice`` over the names of a registry, read when first needed (``--help`` of that
    command, or parsing it), so that ``mpsearch --help`` imports none of the library."""

    def __init__(self, registry: str):
        self._registry, self._names = registry, None
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        if self._names is None:
            module, _, name = self._registry.partition(":")
            self._names = tuple(getattr(importlib.import_module(module), name).in_order())
        return self._names

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns (); the registry decides
        pass


def load_spec(spec_path: str):
    from mpsearch.spec import Spec

    return Spec.load(spec_path)


def emit_json(document: dict) -> None:
    click.echo(json.dumps(document, indent=2))


def storage_option(fn):
    """``--storage`` with the default database (for commands that take no spec)."""
    return click.option(
        "--storage",
        envvar=STORAGE_ENV,
        default=DEFAULT_STORAGE,
        show_default=True,
        help=f"Database URL: sqlite:///FILE.db or postgresql+psycopg://USER@HOST:PORT/DB (or ${STORAGE_ENV}).",
    )(fn)


def spec_storage_option(fn):
    """``--storage`` for commands that take a spec: default the spec's ``storage.url``."""
    return click.option(
        "--storage", envvar=STORAGE_ENV, default=None, help=f"Database URL (default: ${STORAGE_ENV}, else the spec's storage.url)."
    )(fn)


def device_option(fn):
    return click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the spec's search.device, auto: cuda when available).")(fn)


def wide_console(width: int = 150):
    from rich.console import Console

    console = Console()
    console.width = max(console.width, width)  # tables stay whole in a pipe too
    return console


def cell(value, fmt: str = "") -> str:
    return "" if value is None else format(value, fmt)


def finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no infinity: an exact candidate has no noise


PROGRESS_ENV = "MPSEARCH_PROGRESS"


def show_progress() -> bool:
    """Whether to draw progress bars: on stderr, whatever stdout's format (``--json`` too), when
    stderr is a terminal; ``$MPSEARCH_PROGRESS=1`` or ``0`` decides otherwise (a job's log, CI)."""
    import os
    import sys

    forced = os.environ.get(PROGRESS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def unseen_warning(names: list[str]) -> str:
    """The line `layers`, `analyze` and `search` print for searched layers the loss cannot see."""
    return (
        f"the loss cannot see {', '.join(names)}: its sensitivity is exactly 0, so the search gives it the smallest width "
        "and whatever reads its output degrades (layers.unseen = \"exclude\" keeps it at the model's dtype)"
    )

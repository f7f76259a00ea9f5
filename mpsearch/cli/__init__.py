"""The ``mpsearch`` command line: thin commands over the library.

Every command that reports data takes ``--json`` and then prints exactly one JSON document on
stdout. A problem with the input is one line on stderr and exit code 2.

The commands live by what they work on: ``model.py`` (a spec's model: ``layers``, ``quantize``,
``analyze``), ``study.py`` (``search``, ``studies``, ``trials``, ``report``, ``export``, ``eval``) and
``service.py`` (``submit``, ``jobs``, ``serve``, ``db``). They import the library inside each
command, so ``mpsearch --help`` starts without loading torch, Ray or Optuna.
"""

from __future__ import annotations

import sys

import click

from mpsearch.errors import MPSearchError

EXIT_BAD_INPUT = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mpsearch", prog_name="mpsearch")
def cli() -> None:
    """Find per-layer bit-widths (2, 3, 4, 8 or 16) that fit a memory budget and lose the least.

    Start with `mpsearch layers studies/minilm.toml`.
    """


from mpsearch.cli import model, service, study  # noqa: E402,F401 - each adds its commands to `cli`


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

"""The ``mpsearch`` command line: a thin layer over the library.

Every command that reports data takes ``--json`` and then prints exactly one JSON
document on stdout. A problem with the input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import json
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a table.")
def layers(spec: str, as_json: bool) -> None:
    """List the quantizable layers of SPEC's model, with their bytes at each bit-width.

    Bytes follow DESIGN.md: packed codes plus scales (and zero points), fp16 at 16 bits;
    `other_bytes` is everything else in the model, so bytes(plan) = Σ bytes[l][b] + other_bytes.
    """
    from mpsearch.workload import Workload

    s = _load(spec)
    workload = Workload(s, device="cpu")
    table = workload.layer_table()
    budget = s.budget.to_budget()
    limit = table.budget_bytes(budget)
    document = table.to_json()
    document["budget"] = {"spec": str(budget), "bytes": limit, "bpw": (limit - table.other_bytes) * 8 / table.n_weights}
    if as_json:
        _emit_json(document)
        return
    _print_layers(document)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--bits", type=int, required=True, help="The bit-width every layer gets (one of the spec's quant.bits).")
@click.option("--method", type=click.Choice(["rtn", "gptq"]), default=None, help="Override the spec's quant.method.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of a line.")
def quantize(spec: str, bits: int, method: str | None, as_json: bool) -> None:
    """Quantize every layer of SPEC's model at BITS and score it: the uniform baseline.

    Prints the loss on the evaluation set, the exact bytes and the bpw of the uniform plan.
    """
    from mpsearch.quant import quantize_model_
    from mpsearch.workload import Workload

    s = _load(spec)
    if method is not None:
        s = s.with_overrides(quant={**s.quant.model_dump(), "method": method})
    if bits not in s.quant.bits:
        raise MPSearchError(f"--bits {bits} is not in quant.bits {list(s.quant.bits)}; pick one of those or add it to the spec")
    workload = Workload(s, device="cpu")
    table = workload.layer_table()
    plan = table.uniform(bits)
    model = quantize_model_(workload.build_model(), table, plan)
    size = table.bytes(plan)
    document = {"bits": bits, "method": s.quant.method, "bytes": size, "bpw": table.bpw(plan), "loss": workload.loss(model)}
    if as_json:
        _emit_json(document)
        return
    click.echo(f"uniform {bits}-bit {document['method']}: loss {document['loss']:.6g}, {size:,} bytes, {document['bpw']:.4g} bpw")


def _print_layers(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    menu = [str(b) for b in doc["menu"]]
    table = Table(title=f"{len(doc['layers'])} quantizable layers, {doc['n_weights']:,} weights", title_justify="left")
    table.add_column("layer", no_wrap=True)
    table.add_column("kind")
    for header in ("shape", "weights", *[f"{b}-bit B" for b in menu]):
        table.add_column(header, justify="right", no_wrap=True)
    for row in doc["layers"]:
        name = row["name"] + (f"  ({row['rule']})" if row.get("rule") else "")
        table.add_row(name, row["kind"], "×".join(map(str, row["shape"])), f"{row['n']:,}", *[f"{row['bytes'][b]:,}" for b in menu])
    console = Console()
    console.width = max(console.width, 150)  # a layer table is wide; let it be, even in a pipe
    console.print(table)
    for item in doc["excluded"]:
        console.print(f"not quantized: {item['name']} — {item['reason']}")
    console.print(f"other tensors: {doc['other_bytes']:,} bytes")
    console.print("whole model, uniform: " + ", ".join(f"{b}-bit {doc['total_bytes'][b]:,} B" for b in menu))
    b = doc["budget"]
    console.print(f"budget {b['spec']}: {b['bytes']:,} bytes ({b['bpw']:.4g} bpw over the quantizable layers)")


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

"""The report page: the figures as PNG data inside one HTML file, the baselines and layers as tables."""

from __future__ import annotations

import base64
import html
import os
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mpsearch.errors import MPSearchError
from mpsearch.report import _figures
from mpsearch.report._data import SENSITIVITY_LABELS, StudyData, gather

# (file stem, heading, what it shows), in page order.
FIGURES = (
    ("loss_by_trial", "Loss by trial", "Every complete trial's loss on the evaluation split by trial number; the green step is the best so far within the budget, the lines are the baselines (warm starts)."),
    ("loss_by_size", "Loss by size", "Loss against the model's size (bits per quantizable weight on the top axis) for every complete trial, the (loss, bytes) Pareto front and the budget."),
    ("best_plan", "The best plan", "Bits per layer of the best plan within the budget, grouped by block (block names above), over each layer's sensitivity."),
    ("top_k_bits", "Where the search is sure", "For each layer, the share of the top plans within the budget that give it each bit-width; a dark single cell is a settled layer, a spread column an open one."),
)
PAGE = "report.html"
FILES = (PAGE, *(f"{stem}.png" for stem, _, _ in FIGURES))

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
figure { margin: 0; overflow-x: auto; } figure img { max-width: none; height: auto; display: block; }
figcaption, .note { color: #555; font-size: 0.9em; margin: 0.3em 0 0.8em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }
th { text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { color: #555; } dd { margin: 0; }
"""


@dataclass
class Report:
    """A rendered report: the page and each figure's PNG, by file name."""

    study: str
    html: str
    pngs: dict[str, bytes]

    def files(self) -> dict[str, bytes]:
        return {PAGE: self.html.encode(), **self.pngs}


def render(data: StudyData) -> Report:
    """The figures of ``data`` and the page that embeds them."""
    pngs = {f"{stem}.png": _figures.png(getattr(_figures, stem)(data)) for stem, _, _ in FIGURES}
    return Report(study=data.name, html=_page(data, pngs), pngs=pngs)


def report_html(storage, study: str, top_k: int = 10) -> str:
    """The report page of ``study`` (what ``GET /studies/{name}/report`` returns)."""
    return render(gather(storage, study, top_k)).html


def write_report(storage, study: str, out: str | Path, top_k: int = 10, force: bool = False) -> list[tuple[str, int]]:
    """Write the page and PNGs of ``study`` into ``out``: ``[(file, bytes)]``.

    Other files in ``out`` are left alone; a report file already there is replaced only with
    ``force``. Each file is written beside its name and renamed into place, so a reader never
    sees half a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MPSearchError(f"--out {str(out)!r} is a file; give a folder")
    there = [name for name in FILES if (out / name).exists()]
    if there and not force:
        raise MPSearchError(f"--out {str(out)!r} already holds {', '.join(there)}; pass --force to replace the report, or another folder")
    report = render(gather(storage, study, top_k))
    try:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, content in report.files().items():
            tmp = out / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                tmp.write_bytes(content)
                os.replace(tmp, out / name)
            finally:
                tmp.unlink(missing_ok=True)
            written.append((name, len(content)))
    except OSError as e:
        raise MPSearchError(f"cannot write the report into --out {str(out)!r} ({e.strerror or e}); choose a folder you can write to") from None
    return written


# -- the page -------------------------------------------------------------------------------


def _num(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _summary(data: StudyData) -> str:
    o, meta = data.outcome, data.meta
    budget = data.budget_bytes
    bpw = data.bpw(budget)
    states = {}
    for r in data.records:
        states[r.state.lower()] = states.get(r.state.lower(), 0) + 1
    best = o.best or {}
    rows = [
        ("study", data.name),
        ("model", _model(meta)),
        ("layers searched", f"{len(data.layers)}, menu {', '.join(map(str, data.menu))} bits"),
        ("budget", "none" if budget is None else f"{budget:,} bytes" + (f" ({bpw:.4g} bpw)" if bpw else "")),
        ("trials", ", ".join(f"{n} {state}" for state, n in sorted(states.items())) or "none"),
        ("best within the budget", f"trial {best['trial']}: loss {best['loss']:.6g}" + (f", test loss {best['test_loss']:.6g}" if best.get("test_loss") is not None else "") + f", {best['bytes']:,} bytes, {best['bpw']:.4g} bpw" if best else "none yet"),
    ]
    return "<dl>" + "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in rows) + "</dl>"


def _model(meta: dict) -> str:
    """The model's registry name; of a path or code source only its kind (the page is served by
    the API, which shows no server paths)."""
    source = str((meta.get("spec") or {}).get("model", {}).get("source", ""))
    kind, sep, _ = source.partition(":")
    return f"{kind}: (a {'folder' if kind == 'hf' else 'function'} given by the spec)" if sep else source


def _baselines(data: StudyData) -> str:
    o = data.outcome
    rows = ([("best found", o.best)] if o.best else []) + sorted(o.baselines.items(), key=lambda kv: kv[1]["loss"])
    if not rows:
        return '<p class="note">No baselines: the study has no complete trial yet.</p>'
    ref = min((row["loss"] for row in o.baselines.values()), default=None)
    head = "".join(f"<th>{h}</th>" for h in ("plan", "trial", "loss", "test loss", "bytes", "bpw", "loss / best baseline"))
    body = "".join(
        "<tr>"
        f"<td>{html.escape(name)}</td><td class=n>{row['trial']}</td><td class=n>{row['loss']:.6g}</td>"
        f"<td class=n>{_num(row.get('test_loss'), '.6g')}</td><td class=n>{_num(row.get('bytes'), ',')}</td>"
        f"<td class=n>{_num(row.get('bpw'), '.4g')}</td><td class=n>{_num(row['loss'] / ref if ref else None, '.3f')}</td>"
        "</tr>"
        for name, row in rows
    )
    return f"<table id=baselines><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _layers(data: StudyData) -> str:
    if data.best is None or data.best.plan is None:
        return ""
    bits, shares, k = data.best.plan.bits(), data.top_k_shares(), len(data.top)
    sens = f"sensitivity at {data.sensitivity_bits} bits" if data.sensitivity else None
    head = "".join(f"<th>{h}</th>" for h in ("layer", "bits", *([sens] if sens else []), f"top {k}: bits (plans)"))
    body = []
    for name in data.layers:
        spread = ", ".join(f"{b} ({n})" for b, n in sorted(shares.get(name, {}).items()))
        cells = [f"<td>{html.escape(name)}</td>", f"<td class=n>{bits.get(name, '')}</td>"]
        if sens:
            cells.append(f"<td class=n>{_num(data.sensitivity.get(name), '.4g')}</td>")
        cells.append(f"<td>{spread}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<details><summary>Per layer: the best plan, its sensitivity and the top {k}</summary><table id=layers><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></details>"


def _page(data: StudyData, pngs: dict[str, bytes]) -> str:
    sections = []
    for stem, heading, caption in FIGURES:
        src = "data:image/png;base64," + base64.b64encode(pngs[f"{stem}.png"]).decode("ascii")
        extra = ""
        if stem == "best_plan" and data.sensitivity_method:
            extra = f" Sensitivity: {SENSITIVITY_LABELS.get(data.sensitivity_method, data.sensitivity_method)} ({data.sensitivity_method})."
        elif stem == "best_plan":
            extra = " This study did not record its sensitivity profiles (studies made before the report existed did not)."
        elif stem == "top_k_bits":
            extra = f" Here the top {len(data.top)} plans, of {len(data.complete)} complete trials; red dots: the best plan."
        sections.append(
            f'<section><h2>{heading}</h2><figure><img id="{stem}" src="{src}" alt="{html.escape(heading)}">'
            f"<figcaption>{html.escape(caption + extra)}</figcaption></figure></section>"
        )
    made = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>mpsearch report: {html.escape(data.name)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>mpsearch report: {html.escape(data.name)}</h1>{_summary(data)}"
        + "".join(sections)
        + f"<section><h2>Baselines</h2>{_baselines(data)}</section>"
        + f"<section><h2>Layers</h2>{_layers(data)}</section>"
        + f'<p class="note">Made by mpsearch on {made}. This page embeds its figures and loads nothing else.</p>'
        "</body></html>\n"
    )

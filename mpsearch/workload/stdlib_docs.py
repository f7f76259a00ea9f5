"""An English corpus built offline from the docstrings of Python's standard library.

The default study needs real text without a network. Python's own docstrings are
plenty: several thousand well-formed English sentences. They are read with ``ast``
from the standard library's source files — nothing is imported, so no module's side
effects run — then split into sentences and filtered to plain prose.

The corpus is deterministic for a given Python version: files are read in sorted
order and the sentence list is de-duplicated and sorted, so a seed alone fixes any
sample drawn from it. Because the list holds each sentence once, two disjoint index
sets never share a sentence. Parsing takes seconds, so the parsed paragraphs are kept on
disk beside the candidate banks (``corpora/`` in :func:`~mpsearch.quant.bank.default_cache_dir`)
and read back by the next process, which every Ray worker is.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Bump when the parsing or filtering below changes: cached corpora of older formats are then ignored.
CORPUS_FORMAT = 1

# Test suites, GUI demos and vendored code are not prose about the library.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3", "ensurepip", "idlelib"}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PROSE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'()\-\"/]*[a-z)][.!?]$")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def stdlib_sentences() -> tuple[str, ...]:
    """Every distinct prose sentence of the standard library's docstrings, sorted.

    >>> sentences = stdlib_sentences()
    >>> len(sentences) > 2000 and all(s[0].isupper() and s[-1] in ".!?" for s in sentences)
    True
    """
    return tuple(sorted({s for paragraph in _prose_paragraphs() for s in paragraph}))


@functools.lru_cache(maxsize=1)
def stdlib_paragraphs() -> tuple[str, ...]:
    """Every distinct docstring paragraph of two or more prose sentences, sorted: longer texts,
    for causal language models.

    >>> paragraphs = stdlib_paragraphs()
    >>> len(paragraphs) > 500 and all(len(_SENTENCE_END.split(p)) >= 2 for p in paragraphs)
    True
    """
    return tuple(sorted({" ".join(p) for p in _prose_paragraphs() if len(p) >= 2 and len(p) == p.total}))


class _Paragraph(list):
    """A paragraph's prose sentences; ``total`` counts all its sentences, prose or not."""

    total: int = 0

    def dump(self) -> dict:
        return {"sentences": list(self), "total": self.total}

    @classmethod
    def load(cls, row: dict) -> "_Paragraph":
        paragraph = cls(str(s) for s in row["sentences"])
        paragraph.total = int(row["total"])
        return paragraph


@functools.lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[_Paragraph, ...]:
    files = _source_files(stdlib_root())
    cache = _cache_file(files)
    if cache is not None and cache.is_file():
        try:
            return tuple(_Paragraph.load(row) for row in json.loads(cache.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("the corpus cache %s cannot be read (%s); parsing the standard library again", cache.name, e)
    found = []
    for path in files:
        for doc in _docstrings(path):
            found.extend(_paragraphs(doc))
    if cache is not None:
        _write_atomically(cache, json.dumps([p.dump() for p in found]))
    return tuple(found)


def _cache_file(files: list[Path]) -> Path | None:
    """Where the parsed corpus is kept, beside the candidate banks: one file per Python version,
    standard library and parser, keyed by every source file's name, size and modification time
    (``None``: the disk cache is off)."""
    from mpsearch.quant.bank import default_cache_dir

    folder = default_cache_dir()
    if folder is None:
        return None
    key = hashlib.sha256(f"{CORPUS_FORMAT}\0{sys.version}\0{stdlib_root()}".encode())
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        key.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return folder / "corpora" / f"stdlib-{key.hexdigest()[:24]}.json"


def _write_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file of its own, renamed into place: two
    processes writing at once each leave a whole file. A cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("the corpus cache cannot be written (%s); the corpus is parsed again next time", e.strerror or e)


def _source_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        files.extend(Path(folder) / n for n in sorted(names) if n.endswith(".py"))
    return files


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return []  # a few stdlib files are deliberately not valid for this Python
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for node in ast.walk(tree) if isinstance(node, nodes) and (d := ast.get_docstring(node))]


def _paragraphs(doc: str) -> list[_Paragraph]:
    out = []
    for paragraph in re.split(r"\n\s*\n", doc):
        lines = paragraph.splitlines()
        # Code samples, tables and argument lists are indented or use markup; keep flowing prose.
        if any(l.startswith((" ", "\t")) or ">>>" in l or "::" in l for l in lines):
            continue
        text = " ".join(l.strip() for l in lines)
        sentences = [s.strip() for s in _SENTENCE_END.split(text)]
        prose = _Paragraph(s for s in sentences if 40 <= len(s) <= 300 and len(s.split()) >= 6 and _PROSE.match(s))
        prose.total = len(sentences)
        out.append(prose)
    return out

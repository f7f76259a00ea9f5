"""An English corpus built offline from the docstrings of Python's standard library.

The default study needs real text without a network. Python's own docstrings are
plenty: several thousand well-formed English sentences. They are read with ``ast``
from the standard library's source files — nothing is imported, so no module's side
effects run — then split into sentences and filtered to plain prose.

The corpus is deterministic for a given Python version: files are read in sorted
order and the sentence list is de-duplicated and sorted, so a seed alone fixes any
sample drawn from it. Because the list holds each sentence once, two disjoint index
sets never share a sentence.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def _prose_paragraphs() -> tuple[_Paragraph, ...]:
    found = []
    for path in _source_files(stdlib_root()):
        for doc in _docstrings(path):
            found.extend(_paragraphs(doc))
    return tuple(found)


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

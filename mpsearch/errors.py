"""The one family of errors mpsearch raises on bad input.

Every message is a single line that names what is wrong and says what to do. The CLI
prints it as is (exit code 2) and the HTTP API turns it into a 4xx, so a message never
needs a traceback to be understood.
"""

from __future__ import annotations

import re


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none.

    >>> first_line(ValueError("bad value\\nmore detail"))
    'bad value'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


_WORKER_EXIT = re.compile(r"Worker exit type: (\w+)(?:\s+Worker exit detail: (.*?)(?:\.\s|\.?$))?", re.S)
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")


def death_cause(e: BaseException) -> str:
    """Why a Ray actor died, in one line: the error's first line, with Ray's worker exit type
    (``SYSTEM_ERROR`` for a crash or a kernel OOM kill, ``NODE_OUT_OF_MEMORY`` for Ray's memory
    monitor, ``INTENDED_USER_EXIT`` for ``ray.kill``) and the first sentence of its detail;
    addresses are left out.

    >>> death_cause(Exception("The actor died unexpectedly before finishing this task.\\n\\tip: 10.0.0.7\\n"
    ...     "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
    ...     "Worker exit detail: Worker unexpectedly exits with a connection error code 2. End of file."))
    'The actor died unexpectedly before finishing this task (worker exit SYSTEM_ERROR: Worker unexpectedly exits with a connection error code 2)'
    >>> death_cause(Exception("The node at 10.0.0.7:6379 died."))
    'The node at <address> died.'
    """
    head = _ADDRESS.sub("<address>", first_line(e))
    found = _WORKER_EXIT.search(str(e))
    if not found:
        return head
    detail = _ADDRESS.sub("<address>", " ".join((found.group(2) or "").split()))[:160]
    return f"{head.rstrip('.')} (worker exit {found.group(1)}{': ' + detail if detail else ''})"


class MPSearchError(Exception):
    """Base of every error mpsearch raises for a problem the user can fix."""

    def __init__(self, message: str):
        # Keep the message on one line whatever the caller passed in.
        super().__init__(" ".join(str(message).split()))


class SpecError(MPSearchError):
    """A study spec field is missing, mistyped or out of range.

    >>> str(SpecError("budget.bpw", "must be > 0"))
    'budget.bpw: must be > 0'
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        super().__init__(f"{field}: {problem}" if field else problem)


class BudgetError(SpecError):
    """A budget that no plan can meet, or that every plan meets."""


class WorkloadError(MPSearchError):
    """A model, data set or loss that cannot be built or evaluated."""


class StorageError(MPSearchError):
    """A storage URL that is malformed, a database that cannot be reached or logged in to,
    or a schema this mpsearch cannot use."""


class NotFoundError(MPSearchError):
    """A study, job or export that does not exist (a 404 in the HTTP API)."""

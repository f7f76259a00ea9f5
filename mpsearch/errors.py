"""The one family of errors mpsearch raises on bad input.

Every message is a single line that names what is wrong and says what to do. The CLI
prints it as is (exit code 2) and the HTTP API turns it into a 4xx, so a message never
needs a traceback to be understood.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none.

    >>> first_line(ValueError("bad value\\nmore detail"))
    'bad value'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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

"""A small name → factory registry, so behaviour is picked by data, not by if/elif.

>>> losses = Registry("loss")
>>> @losses.register("zero")
... def zero():
...     return 0
>>> losses.get("zero")()
0
>>> losses.get("one")
Traceback (most recent call last):
...
mpsearch.errors.MPSearchError: unknown loss 'one'; choose one of: zero
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from mpsearch.errors import MPSearchError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise MPSearchError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """The names in the order they were registered (the built-in ones first)."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

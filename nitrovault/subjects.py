"""A bounded per-subject table with least-recently-used eviction: the memory bound of the enclave's
per-subject state (quota accounts, privacy budgets, extraction windows and blocks).

What it owns: the mapping subject -> state, its bound and its recency order. What the state means, when
it is reset and what a refusal is stays with the caller.

Invariants:

* ``len(table) <= max_entries`` after every operation; ``max_entries < 1`` is a :class:`ConfigError`;
* recency: :meth:`get`, :meth:`get_or_create` and :meth:`put` make the subject the most recently used;
  :meth:`peek`, ``in``, iteration and :meth:`pop` do not change the order of the others;
* eviction happens only when an insert makes the table exceed its bound, and drops the least recently
  used entries (never the one just inserted); an evicted subject simply starts over if it returns;
* iteration yields subjects from least to most recently used.

Not thread-safe by design: every caller already holds its own lock around a compound operation (look
up, then check and update the state), and the table is always used under that lock. Pure: stdlib only,
no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from nitrovault.errors import ConfigError

__all__ = ["SubjectTable"]

V = TypeVar("V")


class SubjectTable(Generic[V]):
    """At most ``max_entries`` subjects' state, least recently used evicted first (see the module
    docstring). ``name`` is the setting named in the :class:`ConfigError` of a bad bound."""

    def __init__(self, max_entries: int, *, name: str = "max_subjects") -> None:
        if max_entries < 1:
            raise ConfigError(f"{name} must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[str, V] = OrderedDict()

    @property
    def max_entries(self) -> int:
        return self._max

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, subject: object) -> bool:
        return subject in self._entries

    def __iter__(self) -> Iterator[str]:
        """Subjects from least to most recently used (do not modify the table while iterating)."""
        return iter(self._entries)

    def get(self, subject: str) -> V | None:
        """The subject's state (now the most recently used), or ``None``."""
        if subject not in self._entries:
            return None
        self._entries.move_to_end(subject)
        return self._entries[subject]

    def peek(self, subject: str) -> V | None:
        """The subject's state without counting as use, or ``None``."""
        return self._entries.get(subject)

    def get_or_create(self, subject: str, factory: Callable[[], V]) -> V:
        """The subject's state, made by ``factory()`` if absent (evicting the least recently used beyond
        the bound); either way it is now the most recently used."""
        if subject in self._entries:
            self._entries.move_to_end(subject)
            return self._entries[subject]
        value = factory()
        self._insert(subject, value)
        return value

    def put(self, subject: str, value: V) -> None:
        """Set the subject's state (replacing any), as the most recently used."""
        self._insert(subject, value)

    def pop(self, subject: str) -> V | None:
        """Remove and return the subject's state, or ``None``."""
        return self._entries.pop(subject, None)

    def _insert(self, subject: str, value: V) -> None:
        self._entries[subject] = value
        self._entries.move_to_end(subject)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

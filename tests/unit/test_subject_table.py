"""The bounded LRU per-subject table behind the quota ledger, privacy budget and extraction monitor."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nitrovault.errors import ConfigError
from nitrovault.subjects import SubjectTable


def const(value: int) -> Callable[[], int]:
    return lambda: value


def test_bound_is_respected_and_the_least_recently_used_goes_first() -> None:
    table: SubjectTable[int] = SubjectTable(3)
    for i, s in enumerate("abcde"):
        table.get_or_create(s, const(i))
        assert len(table) <= 3
    assert list(table) == ["c", "d", "e"]
    assert "a" not in table and "b" not in table and "e" in table


def test_get_refreshes_recency_and_peek_does_not() -> None:
    table: SubjectTable[int] = SubjectTable(2)
    table.put("a", 1)
    table.put("b", 2)
    assert table.peek("a") == 1
    assert list(table) == ["a", "b"]
    assert table.get("a") == 1
    assert list(table) == ["b", "a"]
    table.put("c", 3)  # evicts "b", now the least recently used
    assert list(table) == ["a", "c"]
    assert table.get("b") is None and table.peek("b") is None


def test_get_or_create_keeps_existing_state_and_calls_the_factory_only_when_absent() -> None:
    table: SubjectTable[list[int]] = SubjectTable(2)
    calls: list[str] = []

    def factory() -> list[int]:
        calls.append("made")
        return []

    first = table.get_or_create("a", factory)
    first.append(1)
    table.put("b", [])
    assert table.get_or_create("a", factory) is first and calls == ["made"]
    assert list(table) == ["b", "a"]  # refreshed
    table.get_or_create("c", factory)  # evicts "b"
    assert list(table) == ["a", "c"]


def test_put_replaces_and_refreshes_and_pop_removes() -> None:
    table: SubjectTable[float] = SubjectTable(2)
    table.put("a", 1.0)
    table.put("b", 2.0)
    table.put("a", 3.0)
    assert list(table) == ["b", "a"] and table.peek("a") == 3.0
    assert table.pop("a") == 3.0 and table.pop("a") is None
    assert len(table) == 1 and list(table) == ["b"]


def test_a_bound_of_one_keeps_just_the_newest() -> None:
    table: SubjectTable[int] = SubjectTable(1)
    table.put("a", 1)
    assert table.get_or_create("b", lambda: 2) == 2
    assert list(table) == ["b"] and table.max_entries == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_a_bound_below_one_is_a_config_error(bad: int) -> None:
    with pytest.raises(ConfigError, match="max_subjects must be at least 1"):
        SubjectTable(bad)
    with pytest.raises(ConfigError, match="max_blocks"):
        SubjectTable(bad, name="max_blocks")


_ops = st.lists(
    st.tuples(st.sampled_from(["get", "peek", "create", "put", "pop"]), st.sampled_from("abcdef"),
              st.integers(0, 9)),
    max_size=60,
)


@given(bound=st.integers(1, 4), ops=_ops)
def test_matches_a_reference_lru(bound: int, ops: list[tuple[str, str, int]]) -> None:
    table: SubjectTable[int] = SubjectTable(bound)
    ref: OrderedDict[str, int] = OrderedDict()  # least recently used first
    for op, s, v in ops:
        if op == "get":
            expected = ref.get(s)
            if s in ref:
                ref.move_to_end(s)
            assert table.get(s) == expected
        elif op == "peek":
            assert table.peek(s) == ref.get(s)
        elif op == "pop":
            assert table.pop(s) == ref.pop(s, None)
        else:
            if op == "put" or s not in ref:
                ref[s] = v
            ref.move_to_end(s)
            if len(ref) > bound:
                ref.popitem(last=False)
            if op == "put":
                table.put(s, v)
            else:
                assert table.get_or_create(s, const(v)) == ref[s]
        assert list(table) == list(ref)
        assert len(table) == len(ref) <= bound
        assert all((x in table) == (x in ref) for x in "abcdef")

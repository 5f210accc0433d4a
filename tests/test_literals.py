"""Shape normalization of literal SQL (rewriter.literals): pure, no database."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast import parse_sql

from rewriter.literals import normalize, shape_is_safe, substitute


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, v FROM t WHERE id = 12345 AND v <> 'x''y'",
        "select a-1, -5, x - -3 from t where k in (1,2,-3) limit 10",
        "select E'a\\nb', $$q$$, 1.5e3, 3000000000 from t",
        "insert into t values (-77, 'neg', 1) returning *",
        "select 'it''s', \"we$1ird\" from t where k = 1",
    ],
)
def test_substitute_restores_the_exact_text(sql: str) -> None:
    n = normalize(sql)
    assert n is not None
    assert "$1" in n.shape
    assert substitute(n.shape, n.literals) == sql
    parse_sql(n.shape)  # the shape is valid SQL


def test_negative_numbers_are_one_literal_but_subtraction_is_not() -> None:
    n = normalize("select a - 1, -5 from t where k = -3")
    assert n is not None
    assert [lit.text for lit in n.literals] == ["1", "-5", "-3"]
    assert n.shape == "select a - $1, $2 from t where k = $3"


def test_key_separates_literal_kinds_that_type_columns_differently() -> None:
    a = normalize("select 1 from t where k = 5")
    b = normalize("select 1.5 from t where k = 5")
    c = normalize("select 3000000000 from t where k = 5")
    d = normalize("select 2 from t where k = 6")
    assert a and b and c and d
    assert a.key != b.key and a.key != c.key
    assert a.key == d.key


def test_values_of_strings_and_unknown_forms() -> None:
    n = normalize("select 'x''y', E'a', $$b$$ from t")
    assert n is not None
    assert [lit.value for lit in n.literals] == ["x'y", None, None]


def test_statements_with_parameters_are_left_alone() -> None:
    assert normalize("select * from t where k = $1") is None
    assert normalize("select * from t") is None


def test_positional_group_and_order_are_not_normalized() -> None:
    for sql in ("select k, count(*) from t group by 1", "select k from t order by 1", "select distinct on (1) k from t"):
        n = normalize(sql)
        assert n is not None
        assert not shape_is_safe(parse_sql(n.shape)[0].stmt)
    n = normalize("select k from t where k > 3 order by k limit 5")
    assert n is not None and shape_is_safe(parse_sql(n.shape)[0].stmt)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(-(2**63), 2**63 - 1), st.text(max_size=8)), min_size=1, max_size=6))
def test_round_trip_property(values: list[object]) -> None:
    parts = []
    for v in values:
        if isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append("'" + v.replace("\x00", "").replace("'", "''") + "'")
    sql = "select " + ", ".join(parts) + " from t where k = 1"
    n = normalize(sql)
    assert n is not None
    assert substitute(n.shape, n.literals) == sql

"""SQL quoting of identifiers and string literals, as PostgreSQL's own functions do it.

One place for every module that writes SQL text (shard DDL, COPY, catalog statements,
set_config): a hand-rolled "isidentifier() and lower()" test misses keywords, so a column named
``order`` or ``user`` would come out unquoted and break the statement.
"""

from __future__ import annotations

from pglast.keywords import UNRESERVED_KEYWORDS


def quote_ident(name: str) -> str:
    """Quote an identifier exactly when PostgreSQL's ``quote_ident`` would.

    Safe without quotes: lower-case ASCII letters, digits and ``_``, not starting with a digit,
    and not a keyword other than an unreserved one. pglast's keyword lists are those of a newer
    parser than the nodes' (PostgreSQL 15); a word that became a keyword later is quoted too,
    which is always harmless.
    """
    safe = bool(name) and (name[0] == "_" or "a" <= name[0] <= "z")
    if safe:
        safe = all(ch == "_" or "a" <= ch <= "z" or "0" <= ch <= "9" for ch in name)
    if safe and name in _KEYWORDS_NEEDING_QUOTES:
        safe = False
    return name if safe else '"' + name.replace('"', '""') + '"'


def _keywords_needing_quotes() -> frozenset[str]:
    from pglast import keywords

    every = (
        set(keywords.RESERVED_KEYWORDS)
        | set(keywords.COL_NAME_KEYWORDS)
        | set(keywords.TYPE_FUNC_NAME_KEYWORDS)
    )
    return frozenset(every - set(UNRESERVED_KEYWORDS))


_KEYWORDS_NEEDING_QUOTES = _keywords_needing_quotes()


def quote_literal(value: str) -> str:
    """A SQL string literal, like PostgreSQL's ``quote_literal`` (``E''`` when it has backslashes).

    The ``E''`` form keeps the literal right whatever ``standard_conforming_strings`` says.
    """
    body = value.replace("'", "''")
    if "\\" in value:
        return "E'" + body.replace("\\", "\\\\") + "'"
    return "'" + body + "'"


def qualified_name(schema: str, name: str) -> str:
    """``schema.name`` with both parts quoted as needed."""
    return f"{quote_ident(schema)}.{quote_ident(name)}"

"""Find the distributed and reference tables a statement reads or writes, and where they sit.

A *scope* is one query level (a SELECT, UPDATE, DELETE or INSERT with its own FROM). Each
``Occurrence`` is one mention of a catalog table in a FROM/JOIN/target position, with the alias
the statement uses for it and whether it sits at the top level of the statement or nested in a
subquery, CTE or set-operation branch. CTE names shadow tables of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pglast import ast

from rewriter.model import ClusterModel, TableInfo


@dataclass(eq=False)
class Occurrence:
    table: TableInfo
    node: ast.RangeVar
    alias: str  # what column references use: the alias, else the table name
    top_level: bool
    index: int = 0  # position in the statement's list of occurrences (placeholder number)
    scope: ast.Node | None = None  # the innermost statement (query level) the mention belongs to

    @property
    def is_reference(self) -> bool:
        return self.table.is_reference


@dataclass
class RelationScan:
    occurrences: list[Occurrence] = field(default_factory=list)
    other_relations: list[ast.RangeVar] = field(default_factory=list)  # tables the catalog does not know

    @property
    def distributed(self) -> list[Occurrence]:
        return [o for o in self.occurrences if not o.is_reference]

    @property
    def reference(self) -> list[Occurrence]:
        return [o for o in self.occurrences if o.is_reference]

    @property
    def tables(self) -> list[TableInfo]:
        seen: dict[tuple[str, str], TableInfo] = {}
        for o in self.occurrences:
            seen.setdefault((o.table.schema, o.table.name), o.table)
        return list(seen.values())


_STATEMENTS = (ast.SelectStmt, ast.InsertStmt, ast.UpdateStmt, ast.DeleteStmt)


def scan_relations(stmt: ast.Node, model: ClusterModel, search_path: tuple[str, ...]) -> RelationScan:
    """All catalog tables mentioned in ``stmt``, in textual order, with top-level/nested marks."""
    cte_names = {n.ctename for n in walk(stmt) if isinstance(n, ast.CommonTableExpr)}
    result = RelationScan()

    def visit(node: object, nested: bool, scope: ast.Node) -> None:
        if isinstance(node, ast.Node):
            if isinstance(node, ast.RangeVar):
                _record(node, nested, scope)
                return
            if isinstance(node, _STATEMENTS):
                if node is not stmt:
                    nested = True
                scope = node
            if isinstance(node, ast.WithClause):
                nested = True
            for name in node:
                visit(getattr(node, name), nested, scope)
        elif isinstance(node, tuple | list):
            for item in node:
                visit(item, nested, scope)

    def _record(node: ast.RangeVar, nested: bool, scope: ast.Node) -> None:
        if node.schemaname is None and node.relname in cte_names:
            return
        table = model.lookup(node.schemaname, node.relname, search_path)
        if table is None:
            result.other_relations.append(node)
            return
        alias = node.alias.aliasname if node.alias is not None else node.relname
        occ = Occurrence(table, node, alias, not nested, len(result.occurrences), scope)
        result.occurrences.append(occ)

    visit(stmt, False, stmt)
    return result


def walk(node):
    """Every ast.Node below ``node`` (inclusive), depth first."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, ast.Node):
            yield n
            for name in n:
                stack.append(getattr(n, name))
        elif isinstance(n, tuple | list):
            stack.extend(n)

"""Typed configs (house style 1): frozen dataclasses whose fields each carry a docstring and whose
`__post_init__` validates with `require`, raising `ValueError` that names the field. Whoever turns
user input into a config (the API, the CLI) maps that `ValueError` to its own error (a 422)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap


def require(ok: bool, field: str, rule: str) -> None:
    """Raise `ValueError("<field>: <rule>")` unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: {rule}")


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right after each field),
    read from its source: field name -> docstring ('' where a field has none)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {f.name: "" for f in dataclasses.fields(cls)}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in docs:
            if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs

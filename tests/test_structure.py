"""The package's shape where import-linter (its contracts in pyproject.toml: stages one way, the CLI a client of
the public API, no cycles) cannot say it: functions stay short; public functions take their options as
keyword-only arguments."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reshard"
MAX_FUNCTION_LINES = 40


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    return [
        (f"{name}:{node.lineno} {node.name}", node)
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]


def body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the signature's end to the last statement, the docstring left out."""
    body = node.body[1:] if node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body
    if not body:
        return 0
    return (node.end_lineno or 0) - body[0].lineno + 1


def test_the_length_check_catches_a_long_function() -> None:
    tree = ast.parse('def f():\n    "doc"\n' + "    x = 1\n" * (MAX_FUNCTION_LINES + 1))
    assert body_lines(tree.body[0]) == MAX_FUNCTION_LINES + 1  # type: ignore[arg-type]


def test_functions_are_short() -> None:
    long = [f"{where}: {body_lines(node)} lines" for where, node in functions() if body_lines(node) > MAX_FUNCTION_LINES]
    assert long == []


def test_public_functions_take_options_as_keywords() -> None:
    """A parameter with a default is an option: keyword-only in every public function (the CLI's commands,
    which typer calls, are not part of the Python API)."""
    positional = []
    for where, node in functions():
        if node.name.startswith("_") or where.startswith("reshard.cli:"):
            continue
        args = node.args
        with_default = args.args[len(args.args) - len(args.defaults) :]
        positional += [f"{where}({a.arg}=...)" for a in with_default]
    assert positional == []


@pytest.mark.parametrize("name", ["split", "merge", "verify", "make_plan", "build_plan", "load_rank"])
def test_the_api_refuses_options_by_position(name: str) -> None:
    import reshard

    params = inspect.signature(getattr(reshard, name)).parameters.values()
    assert all(p.kind is not p.POSITIONAL_OR_KEYWORD or p.default is p.empty for p in params)

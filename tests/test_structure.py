"""The package's shape: imports run one way, stage by stage, with no cycle; functions stay short; public
functions take their options as keyword-only arguments."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reshard"

# Lower stages first. A module may import modules of its own stage or of a lower one, never of a higher one.
STAGES = [
    {"reshard.errors", "reshard.version", "reshard.jsonfile", "reshard.timing"},
    {"reshard.model"},
    {"reshard.plan"},
    {"reshard.formats"},
    {"reshard.engine", "reshard.runtime"},
    {"reshard.report"},
    {"reshard.cli"},
    {"reshard", "reshard.__main__"},
]
# Side by side, neither may import the other.
APART = [("reshard.engine", "reshard.runtime")]
MAX_FUNCTION_LINES = 40


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every reshard module imported anywhere in the file: at the top, inside functions, under TYPE_CHECKING."""
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in known}
    return found


def stage(module: str) -> int:
    for index, members in enumerate(STAGES):
        if module in members:
            return index
    for index, members in enumerate(STAGES):
        if any(module.startswith(m + ".") for m in members if m != "reshard"):
            return index
    raise AssertionError(f"{module} belongs to no stage; add it to STAGES")


def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: imports(tree, set(trees)) - {name} for name, tree in trees.items()}


def test_every_import_runs_down_or_across_the_stages() -> None:
    upward = [
        f"{name} (stage {stage(name)}) imports {target} (stage {stage(target)})"
        for name, targets in graph().items()
        for target in targets
        if stage(target) > stage(name)
    ]
    assert upward == []


def test_side_by_side_stages_do_not_import_each_other() -> None:
    crossing = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for target in targets
        for a, b in APART
        for x, y in ((a, b), (b, a))
        if name.startswith(x + ".") and target.startswith(y + ".")
    ]
    assert crossing == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle() -> None:
    edges = {n: {t for t in ts if t != "reshard"} for n, ts in graph().items() if n != "reshard"}
    assert cycles(edges) == []


def test_the_checks_catch_what_they_are_for() -> None:
    """The walkers above can fail: a cycle and an upward import are found when present."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    tree = ast.parse("def f():\n    from reshard.cli import app\n")
    assert imports(tree, {"reshard.cli"}) == {"reshard.cli"}
    assert stage("reshard.plan.cut") < stage("reshard.cli")


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

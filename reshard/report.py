"""What each command shows of its result: rich tables and lines for a person, and the documents `--json` prints.
Builds renderables and data only; the CLI decides where they go (with markup off, so a tensor or file name is
shown as it is)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table
from tqdm import tqdm

from reshard.errors import one_line
from reshard.formats.export import Layout, engine_data
from reshard.formats.manifest import Manifest
from reshard.formats.names import MANIFEST_NAME, NONE
from reshard.model.rules import Family
from reshard.plan.cut import Plan, TensorCut
from reshard.runtime.forward import KindError

if TYPE_CHECKING:
    from rich.console import RenderableType

    from reshard.engine.merge import MergeResult
    from reshard.engine.planning import Planned
    from reshard.engine.split import SplitResult
    from reshard.engine.verify import VerifyReport

# A tensor name keeps this many columns before the others wrap; a longer one folds.
TENSOR_NAME_WIDTH = 48


def human_bytes(n: float) -> str:
    """Bytes in SI units, three significant digits: 281kB, 13.5GB."""
    return str(tqdm.format_sizeof(n, "B", 1000))


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def plan_summary(plan: Plan, model: Path) -> str:
    return (
        f"{model}: {plan.family} family, {len(plan.tensors)} tensors, {human_bytes(plan.nbytes)}, "
        f"tp {plan.tp} on {', '.join(plan.tp_config.device(r) for r in range(plan.tp))}"
    )


def _family_rows(families: Sequence[Family]) -> list[tuple[str, str, str]]:
    return [
        (f.name + (f" (extends {f.extends})" if f.extends else ""), ", ".join(f.model_types) or "(a base for others)", f.notes)
        for f in families
    ]


def family_table(families: Sequence[Family]) -> Table:
    """The built-in families: their model types (detected from config.json) and what is special in each."""
    table = Table(title="Families", title_justify="left", show_lines=True)
    for column in ("family", "model types", "what is special"):
        table.add_column(column)
    for row in _family_rows(families):
        table.add_row(*row)
    return table


def family_markdown(families: Sequence[Family]) -> str:
    """The same, as docs/rules.md shows it."""
    lines = ["| family | model types | what is special |", "|---|---|---|"]
    cells = ([c.replace("|", "\\|") for c in row] for row in _family_rows(families))  # q|k|v is not a column break
    lines += [f"| {name} | {types} | {notes} |" for name, types, notes in cells]
    return "\n".join(lines) + "\n"


def tensor_table(plan: Plan) -> Table:
    table = Table(title="Tensors", title_justify="left")
    # The name folds where the terminal is narrow; the short columns never break.
    longest = max((len(t.name) for t in plan.tensors), default=0)
    table.add_column("tensor", overflow="fold", min_width=min(longest, TENSOR_NAME_WIDTH))
    for column in ("rule", "cut", "dtype", "shape", "per rank"):
        table.add_column(column, no_wrap=True)
    table.add_column("bytes/rank", justify="right", no_wrap=True)
    rows = [
        [t.name, t.rule or "(none: 1-D)", _cut(t), t.dtype, _shape(t.shape), _shape(t.rank_shape(0)), human_bytes(t.rank_nbytes(0))]
        for t in plan.tensors
    ]
    return _with_notes(table, rows, [cut_notes(t) for t in plan.tensors])


def rule_table(plan: Plan) -> Table:
    """The plan in a screen: one row per rule (or kind of tensor), its cut, how many tensors it takes and their bytes
    in all and on the rank that holds most."""
    rows: dict[tuple[str, str, str], list[TensorCut]] = {}
    for t in plan.tensors:
        rows.setdefault((t.rule or "(none: 1-D)", t.style, "-" if t.dim is None else str(t.dim)), []).append(t)
    table = Table(title="Rules", title_justify="left")
    table.add_column("rule", overflow="fold")
    table.add_column("style", no_wrap=True)
    for column in ("dim", "tensors", "bytes", "per rank"):
        table.add_column(column, justify="right", no_wrap=True)
    cells, notes = [], []
    for (rule, style, dim), cuts in rows.items():
        per_rank = max(sum(t.rank_nbytes(r) for t in cuts) for r in range(plan.tp))
        cells.append([rule, style, dim, str(len(cuts)), human_bytes(sum(t.nbytes for t in cuts)), human_bytes(per_rank)])
        notes.append(", ".join(dict.fromkeys(n for t in cuts for n in _notes(t))))
    return _with_notes(table, cells, notes)


def _cut(t: TensorCut) -> str:
    return t.style if t.dim is None else f"{t.style} {t.dim}"


def _with_notes(table: Table, rows: list[list[str]], notes: list[str]) -> Table:
    """The rows, and a notes column only when some row has a note."""
    if any(notes):
        table.add_column("notes")
    for cells, note in zip(rows, notes, strict=True):
        table.add_row(*cells, *([note] if any(notes) else []))
    return table


def cut_notes(t: TensorCut) -> str:
    return ", ".join(_notes(t))


def _notes(t: TensorCut) -> list[str]:
    """Where a cut is not a plain chunk: a packed tensor's parts, kv heads shared by ranks, padding."""
    notes = []
    if t.parts:
        notes.append("packed " + " + ".join(map(str, t.parts)))
    if t.dim is not None and t.replicas > 1:
        notes.append(f"slices shared by {t.replicas} ranks")
    if t.padding:
        notes.append(f"+{t.padding} zero rows" if t.dim == 0 else f"+{t.padding} zero columns")
    return notes


def layout_table(layout: Layout, plan: Plan) -> Table:
    """An engine layout: every tensor of the rank files, what it packs and its shape on each rank."""
    table = Table(title=f"Rank files ({layout.format} {layout.version} names)", title_justify="left")
    table.add_column("tensor", no_wrap=True)
    table.add_column("holds")
    table.add_column("dtype")
    table.add_column("per rank")
    for entry in layout_entries(layout, plan):
        shapes = list(dict.fromkeys(_shape(tuple(s)) for s in entry["rank_shapes"]))
        table.add_row(entry["name"], entry["holds"], entry["dtype"], " / ".join(shapes))
    return table


def layout_entries(layout: Layout, plan: Plan) -> list[dict[str, Any]]:
    """The same as data: name, what it holds, dtype and each rank's shape."""
    shapes = [layout.rank_entries(plan.tensors, r) for r in range(plan.tp)]
    found = []
    for i, out in enumerate(layout.tensors):
        if not out.pieces:
            holds = f"constant {out.value:g}"
        elif out.pieces == (out.name,):
            holds = "itself"
        else:
            short = _relative(out.pieces)
            holds = " | ".join(short[:3]) + (f" | … ({len(out.pieces)} tensors)" if len(out.pieces) > 3 else "")
            holds += f", {out.stack} experts stacked" if out.stack else ""
        found.append({"name": out.name, "holds": holds, "dtype": out.dtype, "rank_shapes": [list(s[i][2]) for s in shapes]})
    return found


def _relative(names: Sequence[str]) -> list[str]:
    """Names without the dotted prefix they share (`model.layers.0.self_attn.`), or whole when there is one."""
    parts = [n.split(".") for n in names]
    shared = 0
    while len(names) > 1 and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def rank_table(plan: Plan, *, files: Manifest | None = None, gpu_memory: int | None = None, only: Sequence[int] | None = None) -> Table:
    """Bytes per rank and its device; with `gpu_memory`, whether the rank's weights fit in that much."""
    table = Table(title="Ranks", title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("device")
    if files is not None:
        table.add_column("files")
    table.add_column("bytes", justify="right")
    if gpu_memory is not None:
        table.add_column(f"fits {human_bytes(gpu_memory)}")
    for r in range(plan.tp) if only is None else only:
        cells = [str(r), plan.tp_config.device(r)]
        if files is not None:
            names = files.rank_files[r]
            cells.append(names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)} files)")
        cells.append(human_bytes(plan.rank_nbytes(r)))
        if gpu_memory is not None:
            cells.append("yes" if plan.rank_nbytes(r) <= gpu_memory else "NO")
        table.add_row(*cells)
    return table


def forward_table(errors: Sequence[KindError], tolerance: float) -> Table:
    """`verify --forward`: the worst relative error per kind of tensor (KindError rows)."""
    table = Table(title="Tensor-parallel products", title_justify="left")
    table.add_column("kind")
    table.add_column("combined by")
    table.add_column("tensors", justify="right")
    table.add_column("worst relative error", justify="right")
    table.add_column("in")
    for e in sorted(errors, key=lambda e: e.kind):
        flag = "" if e.worst <= tolerance else "  FAIL"
        table.add_row(e.kind, e.how, str(e.tensors), f"{e.worst:.1e}{flag}", e.worst_tensor)
    return table


def plan_document(planned: Planned, *, gpu_memory: int | None = None) -> dict[str, Any]:
    """`plan --json`: the plan, the rank files' tensors for an engine's output_format, and whether each rank fits."""
    plan, layout = planned.plan, planned.layout
    data = plan.to_dict() | ({"format": layout.format, "layout": layout_entries(layout, plan)} if not layout.own else {})
    for entry in data["ranks"] if gpu_memory is not None else []:
        entry["fits"] = entry["bytes"] <= gpu_memory
    return data


def plan_view(planned: Planned, model: Path, *, gpu_memory: int | None = None, tensors: bool = False) -> list[RenderableType]:
    """`plan`: the summary line, a row per rule (or per tensor), an engine layout's tensors, the ranks."""
    plan, layout = planned.plan, planned.layout
    shown: list[RenderableType] = [plan_summary(plan, model), tensor_table(plan) if tensors else rule_table(plan)]
    if not layout.own:
        data = engine_data(layout.format)
        shown.append(f"Layout: {layout.format} {data.version}, loaded with {data.loader}: {len(layout.tensors)} tensors per rank")
        if tensors:
            shown.append(layout_table(layout, plan))
    shown.append(rank_table(plan, gpu_memory=gpu_memory))
    over = [r for r in range(plan.tp) if gpu_memory is not None and plan.rank_nbytes(r) > gpu_memory]
    if over:
        shown.append(
            f"{len(over)} of {plan.tp} ranks need more than {human_bytes(gpu_memory or 0)} for their weights alone; use a larger --tp"
        )
    return shown


def families_document(families: Sequence[Family]) -> list[dict[str, Any]]:
    return [{"family": f.name, "extends": f.extends, "model_types": list(f.model_types), "notes": f.notes} for f in families]


def split_document(result: SplitResult) -> dict[str, Any]:
    plan, manifest = result.plan, result.manifest
    written = [
        {"rank": r, "device": plan.tp_config.device(r), "files": list(manifest.rank_files[r]), "bytes": plan.rank_nbytes(r)}
        for r in result.ranks
    ]
    data = {"out": str(result.out), "family": plan.family, "tp": plan.tp, "format": manifest.layout.format, "checksum": manifest.checksum}
    return data | {"ranks": written}


def split_view(result: SplitResult) -> list[RenderableType]:
    plan, chosen = result.plan, result.ranks
    every = len(chosen) == plan.tp
    which = "" if every else f", rank{'s' if len(chosen) > 1 else ''} {', '.join(map(str, chosen))} of 0..{plan.tp - 1}"
    return [
        f"Wrote {result.out}: {plan.family} family, tp {plan.tp}{which}, {len(plan.tensors)} tensors per rank",
        rank_table(plan, files=result.manifest, only=None if every else chosen),
    ]


def merge_document(result: MergeResult) -> dict[str, Any]:
    return {
        "out": str(result.out),
        "files": result.files,
        "index": result.index,
        "tensors": result.tensors,
        "bytes": result.nbytes,
        "tp": result.tp,
    }


def merge_line(result: MergeResult) -> str:
    files = result.files[0] if len(result.files) == 1 else f"{len(result.files)} files with {result.index or 'no index'}"
    return f"Wrote {result.out}: {files} ({result.tensors} tensors, {human_bytes(result.nbytes)}) and config.json, from tp {result.tp}"


def forward_problems(errors: Sequence[KindError], tolerance: float) -> list[str]:
    """`verify --forward`: a problem for each kind of tensor whose products are off by more than the tolerance."""
    return [
        f"{e.kind}: relative error {e.worst:.2e} in {e.worst_tensor} is above --tolerance {tolerance:g}; the tensor is cut wrongly, split again"
        for e in errors
        if not e.worst <= tolerance
    ]


def verify_document(report: VerifyReport, errors: Sequence[KindError] | None, problems: Sequence[str]) -> dict[str, Any]:
    manifest = report.manifest
    document: dict[str, Any] = {
        "ok": not problems,
        "checksum": manifest.checksum,
        "files": report.files,
        "file_bytes": report.file_bytes,
        "ranks": list(manifest.ranks_present),
        "tensors": report.tensors,
        "tensor_bytes": report.tensor_bytes,
    }
    if errors is not None:
        document["forward"] = [{"kind": e.kind, "how": e.how, "tensors": e.tensors, "worst": e.worst, "in": e.worst_tensor} for e in errors]
    return document | {"problems": [one_line(p) for p in problems]}


def verify_view(
    report: VerifyReport, split_dir: Path, against: Path | None, errors: Sequence[KindError], tolerance: float
) -> list[RenderableType]:
    """`verify`: what was found right (files, tensors) and the products' table; the problems are the CLI's."""
    shown: list[RenderableType] = []
    manifest = report.manifest
    if report.files_ok:
        present = ", ".join(map(str, manifest.ranks_present)) or "none"
        held = "" if manifest.complete else f" (ranks {present} of 0..{manifest.tp_config.tp - 1})"
        what = "sizes (no checksums: split with --checksum none)" if manifest.checksum == NONE else f"sizes and {manifest.checksum}"
        shown.append(f"{report.files} files ({human_bytes(report.file_bytes)}) match the {what} in {split_dir / MANIFEST_NAME}{held}")
    if against is not None and report.ok:
        shown.append(f"{report.tensors} tensors ({human_bytes(report.tensor_bytes)}): every rank holds exactly its slice of {against}")
    if errors:
        shown.append(forward_table(errors, tolerance))
    return shown


def forward_line(errors: Sequence[KindError], against: Path | None, tolerance: float) -> str:
    worst = max((e.worst for e in errors), default=0.0)
    reference = against if against is not None else "the weights rebuilt from the rank files"
    return f"tensor-parallel products match {reference}: worst relative error {worst:.1e} <= {tolerance:g}"

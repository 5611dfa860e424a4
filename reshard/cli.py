"""The `reshard` command: parses flags, calls the core, prints results. No tensor logic lives here."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, Optional, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand

import reshard
from reshard.errors import CheckFailed, PlanError, ReshardError, UsageError, one_line
from reshard.version import __version__

# The library (the public API in reshard/__init__.py, loaded name by name), numpy, rich and tqdm are imported by
# the commands that use them, so `--version`, `-h` and usage errors answer at once.
if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from reshard import KindError, MergeResult, Planned, SplitResult, VerifyReport

T = TypeVar("T")
# The bar appears only for work that lasts longer, so quick runs and early errors stay clean.
PROGRESS_DELAY_S = 0.5
# verify names at most this many problems, then how many more there are.
MAX_PROBLEMS = 10


class _Command(TyperCommand):
    """Help as a person writes it: `reshard split [OPTIONS] MODEL`, with no type tags beside the arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.strip("{}") for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# Piped output (logs, CI, `| less`) is laid out for this many columns, or $COLUMNS.
PIPED_WIDTH = 120


def _console() -> Console:
    from rich.console import Console

    # Tables fit the terminal (rich reads its width, or $COLUMNS), or PIPED_WIDTH when piped; names are shown as
    # they are, never read as markup.
    measured = sys.stdout.isatty() or os.environ.get("COLUMNS", "").isdigit()
    return Console(width=None if measured else PIPED_WIDTH, markup=False, highlight=False, soft_wrap=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised so that it unwinds like Ctrl-C and the staging folder is removed on the way out."""


ModelArg = Annotated[
    Path,
    typer.Argument(
        metavar="MODEL",
        help="A .safetensors file, a model.safetensors.index.json, a folder holding either, a split folder, or a "
        "Hugging Face Hub repo id (org/name), read from the local cache or downloaded into it.",
        show_default=False,
    ),
]
DirArg = Annotated[Path, typer.Argument(metavar="DIR", help="A folder written by `reshard split`.", show_default=False)]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option("--revision", metavar="REV", help="With a Hub repo id: the branch, tag or commit to read.", show_default=False),
]
TpOpt = Annotated[
    Optional[int],
    typer.Option("--tp", min=1, metavar="N", help="Number of tensor-parallel ranks (or `tp` in a TP config).", show_default=False),
]
DevicesOpt = Annotated[
    Optional[str],
    typer.Option("--devices", metavar="IDS", help="GPU id for each rank, comma-separated: rank r runs on cuda:IDS[r]. Default 0..N-1."),
]
ConfigOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--config",
        metavar="FILE",
        help="The model's config.json, when it is not beside the weights, and/or a TP config (TOML or JSON with "
        "tp and device_ids); may be given twice.",
        show_default=False,
    ),
]
GpuMemoryOpt = Annotated[
    Optional[str],
    typer.Option(
        "--gpu-memory", metavar="SIZE", help="Mark ranks whose weights exceed this much GPU memory, e.g. 80GiB.", show_default=False
    ),
]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", metavar="NAME", help="Use this rules family instead of detecting it.")]
ReplicateOpt = Annotated[
    bool, typer.Option("--replicate-unknown", help="Copy tensors no rule matches whole to every rank instead of refusing.")
]
RulesOpt = Annotated[
    Optional[Path], typer.Option("--rules", metavar="FILE", help="A rules file (JSON) whose rules are tried before the family's.")
]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Output folder. Default: beside the input.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")]
MaxShardOpt = Annotated[
    Optional[str],
    typer.Option(
        "--max-shard-size", metavar="SIZE", help="Cut outputs into files of at most this size, e.g. 5GB or 500MiB.", show_default=False
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ChecksumOpt = Annotated[
    str,
    typer.Option(
        "--checksum",
        metavar="ALGO",
        help="What reshard.json records of every file beside its size: xxh128 (XXH3-128, as `xxh128sum` prints it: "
        "catches corruption and truncation), sha256 (as `sha256sum` prints it: for a manifest kept apart from the "
        "files, against tampering; several times slower) or none. merge, verify and load_rank check it.",
    ),
]
FormatOpt = Annotated[
    str,
    typer.Option(
        "--format",
        metavar="FORMAT",
        help="Layout of the rank files: reshard (each tensor under its own name) or vllm (vLLM's sharded_state).",
    ),
]


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON document on stdout; an error is one too, with the same exit code.")
]
TensorsOpt = Annotated[bool, typer.Option("--tensors", help="Also list every tensor: its rule, cut, shapes and bytes.")]


def _emit(data: object) -> None:
    typer.echo(json.dumps(data, indent=2))


def error_document(lines: Sequence[str], code: int) -> dict[str, Any]:
    """An error as --json prints it: the first problem, all of them, and the exit code."""
    shown = [one_line(line) for line in lines]
    return {"error": shown[0] if shown else "error", "problems": shown, "exit_code": code}


def parse_devices(value: Optional[str]) -> Optional[list[int]]:
    if value is None:
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise UsageError(f"--devices {value!r} is not a comma-separated list of GPU ids, e.g. 0,1,2,3") from None


def _tp_options(
    tp: Optional[int], devices: Optional[str], configs: Optional[list[Path]]
) -> tuple[int, Optional[list[int]], Optional[Path]]:
    """--tp, --devices and the --config files as the API's tp, device_ids and config."""
    return reshard.resolve_tp(tp=tp, device_ids=parse_devices(devices), configs=configs or [])


def _locate(model: Path, revision: Optional[str], quiet: bool) -> Path:
    """MODEL as a path: a Hub repo id is found in the cache or downloaded, with huggingface_hub's bars on a terminal."""
    return reshard.locate_model(model, revision=revision, progress=not quiet and _on_terminal())


def _chosen_ranks(rank: Optional[str], ranks: Optional[str], tp: int) -> Optional[list[int]]:
    """--rank N, --rank auto or --ranks 0,2 as rank numbers; None for every rank."""
    if rank is not None and ranks is not None:
        raise UsageError("pass --rank or --ranks, not both")
    if rank is None and ranks is None:
        return None
    if rank == "auto":
        found = next(((k, os.environ[k]) for k in ("RANK", "SLURM_PROCID") if os.environ.get(k)), None)
        if found is None:
            raise UsageError("--rank auto: neither RANK (torchrun) nor SLURM_PROCID (srun) is set; pass --rank N")
        flag, text = f"--rank auto ({found[0]}={found[1]})", found[1]
    else:
        flag, text = ("--rank", rank) if rank is not None else ("--ranks", ranks or "")
    try:
        chosen = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a rank number{'' if flag != '--ranks' else ' list, e.g. 0,2'}") from None
    outside = [r for r in chosen if not 0 <= r < tp]
    if outside:
        raise UsageError(f"{flag}: rank {outside[0]} is outside 0..{tp - 1} for tp {tp}")
    if len(set(chosen)) != len(chosen):
        raise UsageError(f"{flag}: {text} names a rank twice")
    return sorted(chosen)


def _fail(error: BaseException, lines: Sequence[str], code: int, *, as_json: bool = False) -> NoReturn:
    """One `Error:` line per problem on stderr (a name holding a line break cannot make a line of its own), or
    with --json one error document on stdout."""
    if os.environ.get("RESHARD_DEBUG"):
        raise error
    if as_json:
        _emit(error_document(lines, code))
    else:
        for line in lines:
            typer.echo(f"Error: {one_line(line)}", err=True)
    raise typer.Exit(code)


def _run(action: Callable[[], T], *, writes: bool, as_json: bool = False) -> T:
    """Turn the errors a user can act on into one line each on stderr and an exit code. Only a command that was
    writing says that nothing was written (its staging is gone by then)."""
    nothing = "; nothing was written" if writes else ""
    try:
        return action()
    except (PlanError, CheckFailed) as e:
        _fail(e, [str(p) for p in e.problems], e.exit_code, as_json=as_json)
    except ReshardError as e:
        _fail(e, [str(e)], e.exit_code, as_json=as_json)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        _fail(e, [f"{where}{e.strerror or e}{nothing}"], 1, as_json=as_json)
    except Terminated as e:
        _fail(e, [f"terminated{nothing}"], 143, as_json=as_json)
    except KeyboardInterrupt as e:
        _fail(e, [f"interrupted{nothing}"], 130, as_json=as_json)


def _on_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def _progress(desc: str, quiet: bool) -> Iterator[Callable[[int, int], object]]:
    """The API's progress callback (bytes just done, and the total) as a tqdm bar."""
    from tqdm import tqdm

    # A bar only for a person at a terminal: logs and captured stderr get results and errors, never bar frames.
    shown = not quiet and _on_terminal()
    bar = tqdm(total=None, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not shown, delay=PROGRESS_DELAY_S)
    lock = threading.Lock()  # the engines report from several threads

    def update(n: int, total: int) -> None:
        with lock:
            bar.total = total
            bar.update(n)

    try:
        yield update
    finally:
        bar.close()


def _show(*renderables: RenderableType) -> None:
    console = _console()
    for renderable in renderables:
        console.print(renderable)


@app.command("plan", cls=_Command)
def plan_command(
    model: ModelArg,
    tp: TpOpt = None,
    devices: DevicesOpt = None,
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    replicate_unknown: ReplicateOpt = False,
    rules: RulesOpt = None,
    gpu_memory: GpuMemoryOpt = None,
    output_format: FormatOpt = "reshard",
    revision: RevisionOpt = None,
    tensors: TensorsOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show how the tensors would be cut and what each rank gets, without writing anything: a row per rule, then
    the ranks; --tensors lists every tensor."""

    def action() -> tuple[Planned, Optional[int]]:
        limit = reshard.parse_size(gpu_memory, flag="--gpu-memory") if gpu_memory is not None else None
        count, device_ids, model_config = _tp_options(tp, devices, config)
        planned = reshard.make_plan(
            _locate(model, revision, False), tp=count, device_ids=device_ids, config=model_config, arch=arch,
            replicate_unknown=replicate_unknown, rules=rules, output_format=output_format,
        )  # fmt: skip
        return planned, limit

    planned, limit = _run(action, writes=False, as_json=as_json)
    import reshard.report as report

    if as_json:
        _emit(report.plan_document(planned, gpu_memory=limit))
    else:
        _show(*report.plan_view(planned, model, gpu_memory=limit, tensors=tensors))


@app.command("families", cls=_Command)
def families_command(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table in Markdown, as docs/rules.md shows it.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the built-in families: the model types each is detected from, and what is special in each."""
    import reshard.report as report

    families = list(reshard.builtin_families().values())
    if as_json:
        _emit(report.families_document(families))
    elif markdown:
        typer.echo(report.family_markdown(families), nl=False)
    else:
        _show(report.family_table(families), f"{sum(len(f.model_types) for f in families)} model types in {len(families)} families")


@app.command("split", cls=_Command)
def split_command(
    model: ModelArg,
    tp: TpOpt = None,
    out: OutOpt = None,
    devices: DevicesOpt = None,
    config: ConfigOpt = None,
    arch: ArchOpt = None,
    replicate_unknown: ReplicateOpt = False,
    rules: RulesOpt = None,
    max_shard_size: MaxShardOpt = None,
    rank: Annotated[
        Optional[str],
        typer.Option(
            "--rank",
            metavar="R",
            help="Write only rank R; `auto` takes it from RANK (torchrun) or SLURM_PROCID (srun).",
            show_default=False,
        ),
    ] = None,
    ranks: Annotated[
        Optional[str], typer.Option("--ranks", metavar="R,R", help="Write only these ranks, comma-separated, e.g. 0,2.", show_default=False)
    ] = None,
    output_format: FormatOpt = "reshard",
    revision: RevisionOpt = None,
    checksum: ChecksumOpt = reshard.DEFAULT_CHECKSUM,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write safetensors files for each rank, config.json and the manifest reshard.json (default output
    folder: <model folder>-tp<N> beside it, or <model folder>-vllm-tp<N> with --format vllm; ./<name>-tp<N> for a
    model in the Hugging Face cache)."""

    def action() -> SplitResult:
        count, device_ids, model_config = _tp_options(tp, devices, config)
        chosen = _chosen_ranks(rank, ranks, count)
        max_bytes = reshard.parse_size(max_shard_size) if max_shard_size is not None else None
        with _progress("split", quiet) as progress:
            return reshard.split(
                _locate(model, revision, quiet), tp=count, device_ids=device_ids, config=model_config, out=out, arch=arch,
                replicate_unknown=replicate_unknown, rules=rules, max_shard_size=max_bytes, ranks=chosen,
                output_format=output_format, checksum=checksum, force=force, progress=progress,
            )  # fmt: skip

    result = _run(action, writes=True, as_json=as_json)
    import reshard.report as report

    if as_json:
        _emit(report.split_document(result))
    else:
        _show(*report.split_view(result))


@app.command("merge", cls=_Command)
def merge_command(
    split_dir: DirArg,
    out: OutOpt = None,
    max_shard_size: MaxShardOpt = None,
    force: ForceOpt = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild the original checkpoint from a split folder, bit for bit, in the source's own files (default output
    folder: <DIR>-merged)."""

    def action() -> MergeResult:
        max_bytes = reshard.parse_size(max_shard_size) if max_shard_size is not None else None
        with _progress("merge", quiet) as progress:
            return reshard.merge(split_dir, out=out, force=force, progress=progress, max_shard_size=max_bytes)

    result = _run(action, writes=True, as_json=as_json)
    import reshard.report as report

    if as_json:
        _emit(report.merge_document(result))
    else:
        _show(report.merge_line(result))


@app.command("verify", cls=_Command)
def verify_command(
    split_dir: DirArg,
    against: Annotated[
        Optional[Path],
        typer.Option(
            "--against",
            metavar="MODEL",
            help="The checkpoint DIR was split from (a path or a Hub repo id): compare every rank tensor with its slice.",
            show_default=False,
        ),
    ] = None,
    forward: Annotated[
        bool, typer.Option("--forward", help="Also run every sharded weight tensor-parallel, one process per rank (needs torch).")
    ] = False,
    rules: Annotated[
        Optional[Path],
        typer.Option("--rules", metavar="FILE", help="With --forward: the rules file DIR was split with.", show_default=False),
    ] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="X", help="Worst relative error --forward accepts.")] = 1e-5,
    device: Annotated[
        Optional[str],
        typer.Option(
            "--device", metavar="DEVICE", help="Run --forward on this device instead of each rank's GPU, e.g. cpu.", show_default=False
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Check every file against the sizes and checksums in the manifest and, with --against, every tensor against
    the source."""

    def check() -> VerifyReport:
        with _progress("verify", quiet) as progress:
            return reshard.verify(split_dir, against=against, progress=progress)

    found = _run(check, writes=False, as_json=as_json)
    # The products run even when --against found problems (they show where it matters), not on bad checksums.
    run_forward = forward and found.files_ok
    errors = _run(lambda: _forward(split_dir, against, device, rules), writes=False, as_json=as_json) if run_forward else []
    import reshard.report as report

    problems = found.problems + report.forward_problems(errors, tolerance)
    if as_json:
        _emit(report.verify_document(found, errors if forward else None, problems))
        raise typer.Exit(1 if problems else 0)
    lead = os.environ.get("RANK", "0") == "0"  # under torchrun, one process reports
    if lead:
        _show(*report.verify_view(found, split_dir, against, errors, tolerance))
    if problems:
        shown = problems[:MAX_PROBLEMS] + ([f"{len(problems) - MAX_PROBLEMS} more problems"] if len(problems) > MAX_PROBLEMS else [])
        _fail(CheckFailed(shown), shown, 1)
    if lead and forward:
        _show(report.forward_line(errors, against, tolerance))


def _forward(split_dir: Path, against: Optional[Path], device: Optional[str], rules: Optional[Path]) -> list[KindError]:
    try:
        import torch  # noqa: F401  (the products need it; reshard itself does not)
    except ImportError:
        raise UsageError("verify --forward needs torch; install the torch extra: pip install -e '.[torch]' in reshard's folder") from None
    return reshard.run_forward(split_dir, device=device, source=against, rules=rules)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"reshard {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Split LLM safetensors checkpoints for tensor parallelism, and merge them back bit for bit.

    Set RESHARD_DEBUG=1 to see a traceback with any error.
    """


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _usage_error(error: Exception) -> NoReturn:
    code = getattr(error, "exit_code", 2)
    if "--json" in sys.argv[1:]:
        _emit(error_document([getattr(error, "format_message", error.__str__)()], code))
    elif hasattr(error, "show"):
        error.show()
    else:
        typer.echo(f"Error: {error}", err=True)
    sys.exit(code)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = app(prog_name="reshard", standalone_mode=False)
    except typer.TyperException as e:  # a usage error, found before any command ran
        _usage_error(e)
    except typer.Abort:
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

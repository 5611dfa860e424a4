"""Time reshard's commands against a durable copy of the same bytes and the usual load-everything script.

Makes a synthetic Llama-shaped bf16 checkpoint of the given size (random bytes, config.json), then runs, in one
run and alternating round by round: cp, cp followed by sync (the fair limit: reshard writes durably), reshard
split --tp 4, reshard merge, the tp-4 split resplit to tp 2, `reshard split --rank 0` (one rank's file, as each
node of a multi-node job extracts its own), split, merge and resplit again with `--checksum sha256`, split with
`--checksum none` (the bytes moved, nothing hashed), and the usual alternative (safetensors load_file + torch.chunk + save_file per rank, see
naive_split.py). Every command runs as its own process; its wall time and peak resident memory (ru_maxrss, what
/usr/bin/time -v reports) are measured, and each is reported as its best round and as a ratio to cp + sync.
`sync` and a short pause run between commands, untimed, so none pays for another's writeback. The source stays in
the page cache throughout, as it does for a user who just downloaded it.

Then split, merge and resplit run once more with RESHARD_PROFILE set, and their profiles are printed: the seconds
each kind of work took, summed over the threads that did it (more than the wall time when threads overlap), and
the bytes it moved. Last, the speed of each checksum on one core of this machine.

    python benchmarks/bench.py --size 2GiB
    python benchmarks/bench.py --size 8GiB --rounds 3 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from reshard import __version__
from reshard.formats.writer import SafetensorsWriter
from reshard.model.config import parse_size

HERE = Path(__file__).resolve().parent

# Llama-2-7B's shapes; the layer count is chosen to reach the requested size.
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 4096, 32, 8, 11008, 32000


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    head_dim = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (HIDDEN,),
            f"{p}.self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{p}.self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            f"{p}.post_attention_layernorm.weight": (HIDDEN,),
            f"{p}.mlp.gate_proj.weight": (FFN, HIDDEN),
            f"{p}.mlp.up_proj.weight": (FFN, HIDDEN),
            f"{p}.mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return shapes | {"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)}


def make_checkpoint(folder: Path, size: int) -> int:
    def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(2 * int(np.prod(s)) for s in shapes.values())

    per_layer = nbytes(llama_shapes(1)) - nbytes(llama_shapes(0))
    layers = max(1, round((size - nbytes(llama_shapes(0))) / per_layer))
    shapes = llama_shapes(layers)
    folder.mkdir(parents=True)
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": FFN,
        "vocab_size": VOCAB, "num_hidden_layers": layers, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)
    entries = [(name, "BF16", shape) for name, shape in shapes.items()]
    with SafetensorsWriter(folder / "model.safetensors", entries, {"format": "pt"}, checksum="none") as writer:
        for name, _, shape in entries:
            writer.region(name).write(rng.bytes(2 * int(np.prod(shape))))
    return (folder / "model.safetensors").stat().st_size


# After sync, virtualised disks can still be flushing their own caches; a pause keeps one command's writes
# from slowing the next.
SETTLE_S = 3.0

TIME = shutil.which("time", path="/usr/bin:/bin")


def run(command: list[str], scratch: Path, *, env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one command in its own process.

    Measured by /usr/bin/time: a child forked straight from this (large) process would report this process's
    peak memory as its own, since Linux carries the high-water mark across exec.
    """
    report = scratch / "time.txt"
    if TIME:
        command = [TIME, "-f", "%e %M", "-o", str(report), *command]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()}")
    if TIME:
        _, rss_kib = report.read_text().split()[-2:]
        return elapsed, int(rss_kib) * 1024
    return elapsed, usage.ru_maxrss * 1024


def hash_speeds() -> str:
    """GB/s of each checksum on one core, hashing 256 MiB in 8 MiB pieces (blake3 too, when it is installed)."""
    import xxhash

    data = memoryview(os.urandom(256 << 20))
    makers = {"sha256": hashlib.sha256, "xxh128": xxhash.xxh3_128}
    try:
        import blake3  # type: ignore[import-not-found]

        makers["blake3"] = blake3.blake3
    except ImportError:
        pass
    speeds = []
    for name, make in makers.items():
        best = float("inf")
        for _ in range(3):
            digest, start = make(), time.perf_counter()
            for i in range(0, len(data), 8 << 20):
                digest.update(data[i : i + (8 << 20)])
            digest.hexdigest()
            best = min(best, time.perf_counter() - start)
        speeds.append(f"{name} {len(data) / best / 1e9:.2f} GB/s")
    return ", ".join(speeds)


def profile(name: str, command: list[str], work: Path, output: Path) -> list[str]:
    """Run a command once with RESHARD_PROFILE and return its profile as table rows."""
    shutil.rmtree(output, ignore_errors=True)
    os.sync()
    time.sleep(SETTLE_S)
    report = work / "profile.json"
    seconds, _ = run(command, work, env=os.environ | {"RESHARD_PROFILE": str(report)})
    data = json.loads(report.read_text())
    rows = [f"| {name} | wall | {seconds:.2f} | | |"]
    for kind, value in data["kinds"].items():
        gb = value["bytes"] / 1e9
        rate = f"{gb / value['seconds']:.2f}" if value["seconds"] and gb else ""
        rows.append(f"| | {kind} | {value['seconds']:.2f} | {gb:.2f} | {rate} |")
    return rows


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.0f} GiB RAM, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout.splitlines()
    return out[-1].split()[1] if len(out) > 1 else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="2GiB", help="checkpoint size, e.g. 2GiB or 8GiB")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all commands, alternating")
    parser.add_argument("--tp", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--no-naive", action="store_true", help="skip the load-everything script (it needs torch)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another reshard source tree (e.g. `git worktree add /tmp/base HEAD~3`): its split and merge run in the same rounds",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reshard-bench-", dir=args.workdir))
    try:
        src = work / "model"
        size = make_checkpoint(src, parse_size(args.size))
        reshard = [sys.executable, "-m", "reshard"]
        split_name, merge_name = f"reshard split --tp {args.tp}", "reshard merge"
        # name -> (output folder, command)
        commands = {
            "cp -r": ("copy", ["cp", "-r", str(src), str(work / "copy")]),
            "cp -r && sync": ("copy", ["sh", "-c", f"cp -r '{src}' '{work / 'copy'}' && sync"]),
            split_name: ("split", [*reshard, "split", str(src), "--tp", str(args.tp), "--out", str(work / "split"), "--quiet"]),
            merge_name: ("merged", [*reshard, "merge", str(work / "split"), "--out", str(work / "merged"), "--quiet"]),
            f"reshard split (resplit {args.tp} -> {args.tp // 2})": (
                "resplit", [*reshard, "split", str(work / "split"), "--tp", str(args.tp // 2), "--out", str(work / "resplit"), "--quiet"]),
            f"reshard split --tp {args.tp} --rank 0": (
                "rank0", [*reshard, "split", str(src), "--tp", str(args.tp), "--rank", "0", "--out", str(work / "rank0"), "--quiet"]),
            f"reshard split --tp {args.tp} --checksum sha256": (
                "split-sha", [*reshard, "split", str(src), "--tp", str(args.tp), "--out", str(work / "split-sha"), "--quiet", "--checksum", "sha256"]),
            "reshard merge (of --checksum sha256)": (
                "merged-sha", [*reshard, "merge", str(work / "split-sha"), "--out", str(work / "merged-sha"), "--quiet"]),
            f"reshard split (resplit {args.tp} -> {args.tp // 2}) --checksum sha256": (
                "resplit-sha", [*reshard, "split", str(work / "split-sha"), "--tp", str(args.tp // 2), "--out", str(work / "resplit-sha"), "--quiet", "--checksum", "sha256"]),
            f"reshard split --tp {args.tp} --checksum none": (
                "split-none", [*reshard, "split", str(src), "--tp", str(args.tp), "--out", str(work / "split-none"), "--quiet", "--checksum", "none"]),
            f"load_file + torch.chunk + save_file (tp {args.tp})": ("naive", [sys.executable, str(HERE / "naive_split.py"), str(src), str(work / "naive"), str(args.tp)]),
        }  # fmt: skip
        if args.baseline is not None:
            base_run = ["env", f"PYTHONPATH={args.baseline.resolve()}", sys.executable, "-m", "reshard"]
            commands[f"{split_name} (baseline)"] = (
                "split-base",
                [*base_run, "split", str(src), "--tp", str(args.tp), "--out", str(work / "split-base"), "--quiet"],
            )
            commands[f"{merge_name} (baseline)"] = (
                "merged-base",
                [*base_run, "merge", str(work / "split-base"), "--out", str(work / "merged-base"), "--quiet"],
            )
        if args.no_naive:
            commands.pop(next(k for k in commands if k.startswith("load_file")))
        times: dict[str, list[float]] = {name: [] for name in commands}
        peaks: dict[str, int] = {name: 0 for name in commands}
        same = True
        for round_ in range(args.rounds):
            for name, (output, command) in commands.items():
                shutil.rmtree(work / output, ignore_errors=True)
                os.sync()
                time.sleep(SETTLE_S)
                seconds, rss = run(command, work)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], rss)
                print(f"round {round_ + 1}: {name}: {seconds:.2f} s, {rss / 2**20:.0f} MiB", file=sys.stderr)
                if name.startswith(merge_name):
                    same &= filecmp.cmp(work / output / "model.safetensors", src / "model.safetensors", shallow=False)
                if output not in ("split", "split-base", "split-sha"):  # merge and resplit read a split; the rest is removed at once
                    shutil.rmtree(work / output, ignore_errors=True)
        base = min(times["cp -r && sync"])
        print(f"Checkpoint: {size / 2**30:.2f} GiB bf16 (Llama-2-7B shapes), tp {args.tp}, {args.rounds} rounds, best round")
        print(f"Machine: {machine()}; {filesystem(work)} filesystem; reshard {__version__}")
        if not TIME:
            print("Peak RSS from wait4 (no /usr/bin/time here): it includes this script's own memory at fork")
        print(f"Merged checkpoint identical to the source: {'yes' if same else 'NO'}")
        print()
        print("| command | seconds (best) | median | vs cp + sync | peak RSS |")
        print("|---|---:|---:|---:|---:|")
        for name in commands:
            best, median = min(times[name]), statistics.median(times[name])
            print(f"| {name} | {best:.2f} | {median:.2f} | {best / base:.2f}x | {peaks[name] / 2**20:.0f} MiB |")
        rank0 = min(times[f"reshard split --tp {args.tp} --rank 0"]) / min(times[split_name])
        print(f"\n--rank 0 takes {rank0:.2f}x the time of the full split.\n")
        print("| command | work | seconds | GB | GB/s |")
        print("|---|---|---:|---:|---:|")
        for name in (split_name, merge_name, f"reshard split (resplit {args.tp} -> {args.tp // 2})"):
            print("\n".join(profile(name, commands[name][1], work, work / commands[name][0])))
        print(f"\nChecksum speed on one core: {hash_speeds()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

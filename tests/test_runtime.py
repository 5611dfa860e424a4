"""GPU placement and the runtime pieces: TP config files, --gpu-memory, load_rank, the communicator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from typer.testing import CliRunner

import reshard
from reshard.cli import app
from reshard.errors import InputError, UsageError
from reshard.runtime.parallel import SingleDevice, TorchDistributed

from helpers import synthetic_llama

runner = CliRunner()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    ("name", "text"),
    [("tp.toml", "tp = 4\ndevice_ids = [3, 2, 1, 0]\n"), ("tp.json", '{"num_devices": 4, "device_ids": [3, 2, 1, 0]}')],
)
def test_tp_config_file_places_ranks(model: Path, tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    out = tmp_path / "split"
    result = invoke("split", model, "--config", tmp_path / name, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "reshard.json").read_text())
    assert manifest["tp"] == 4 and manifest["device_ids"] == [3, 2, 1, 0]
    assert [r["device"] for r in manifest["ranks"]] == ["cuda:3", "cuda:2", "cuda:1", "cuda:0"]


def test_flags_override_the_tp_config_and_a_model_config_can_come_too(model: Path, tmp_path: Path) -> None:
    (tmp_path / "tp.toml").write_text("tp = 4\n")
    (model / "config.json").rename(tmp_path / "llama.json")
    result = invoke(
        "plan", model, "--config", tmp_path / "tp.toml", "--config", tmp_path / "llama.json", "--tp", "2", "--devices", "5,7", "--json"
    )
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["tp"] == 2 and plan["device_ids"] == [5, 7]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tp = 2\ngpus = [0, 1]\n", "unknown key 'gpus' in the TP config; allowed: tp, num_devices, device_ids"),
        ("tp = 2\ndevice_ids = [0, 0]\n", "device_ids must be distinct non-negative GPU ids, got [0, 0]"),
        ("tp = 2\ndevice_ids = [0, -1]\n", "device_ids must be distinct non-negative GPU ids, got [0, -1]"),
        ("tp = 3\ndevice_ids = [0, 1]\n", "device_ids lists 2 ids but tp is 3; give one device id per rank"),
        ("tp = 0\n", "tp must be a positive integer, got 0"),
        ("tp = 2\nnum_devices = 4\n", "tp (2) and num_devices (4) disagree; keep one"),
        ("tp = [2\n", "cannot read the TP config"),
    ],
)
def test_bad_tp_config(model: Path, tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "tp.toml").write_text(text)
    result = invoke("split", model, "--config", tmp_path / "tp.toml", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {tmp_path / 'tp.toml'}: {message}")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_tp_is_required_somewhere(model: Path) -> None:
    result = invoke("plan", model)
    assert result.exit_code == 2
    assert result.stderr == "Error: Missing option '--tp' (or a TP config giving tp, through --config)\n"


def test_gpu_memory_marks_ranks_that_do_not_fit(model: Path) -> None:
    per_rank = json.loads(invoke("plan", model, "--tp", "2", "--json").stdout)["ranks"][0]["bytes"]
    fits = invoke("plan", model, "--tp", "2", "--gpu-memory", f"{per_rank}B")
    assert fits.exit_code == 0 and "NO" not in fits.stdout and "ranks need more than" not in fits.stdout
    tight = invoke("plan", model, "--tp", "2", "--gpu-memory", f"{per_rank - 1}B")
    assert tight.exit_code == 0
    assert tight.stdout.count(" NO ") == 2
    assert "2 of 2 ranks need more than" in tight.stdout
    as_json = json.loads(invoke("plan", model, "--tp", "2", "--gpu-memory", f"{per_rank - 1}B", "--json").stdout)
    assert [r["fits"] for r in as_json["ranks"]] == [False, False]
    bad = invoke("plan", model, "--tp", "2", "--gpu-memory", "lots")
    assert (bad.exit_code, bad.stderr) == (2, "Error: --gpu-memory 'lots' is not a size; write e.g. 5GB, 500MB or 2GiB\n")


def test_load_rank_on_cpu(model: Path, tmp_path: Path) -> None:
    out = reshard.split(model, tp=2, out=tmp_path / "split", device_ids=[1, 0]).out
    for rank in range(2):
        weights = reshard.load_rank(out, rank, device="cpu")
        stored = load_file(out / f"model-rank-{rank}-part-0.safetensors")
        manifest = json.loads((out / "reshard.json").read_text())
        assert list(weights) == list(manifest["tensors"])
        assert all(torch.equal(weights[k].view(torch.uint8), stored[k].view(torch.uint8)) for k in stored)
        assert all(w.device.type == "cpu" for w in weights.values())
    with pytest.raises(UsageError, match=r"rank 2 is outside this split's ranks 0..1"):
        reshard.load_rank(out, 2, device="cpu")
    with pytest.raises(UsageError, match=r"'gpu7' is not a torch device"):
        reshard.load_rank(out, 0, device="gpu7")
    (out / "model-rank-1-part-0.safetensors").unlink()
    with pytest.raises(InputError, match=r"model-rank-1-part-0.safetensors: missing; the split folder is incomplete"):
        reshard.load_rank(out, 1, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_load_rank_without_cuda_says_how(model: Path, tmp_path: Path) -> None:
    out = reshard.split(model, tp=2, out=tmp_path / "split").out
    with pytest.raises(
        InputError, match=r"rank 1 goes on cuda:1 \(its manifest device\), but torch sees no CUDA device; pass device='cpu'"
    ):
        reshard.load_rank(out, 1)


@cuda
def test_load_rank_places_each_rank_on_its_manifest_gpu(model: Path, tmp_path: Path) -> None:
    count = torch.cuda.device_count()
    ids = list(reversed(range(count)))[:2] if count > 1 else [0]
    out = reshard.split(model, tp=len(ids), out=tmp_path / "split", device_ids=ids).out
    for rank, gpu in enumerate(ids):
        weights = reshard.load_rank(out, rank)
        assert {w.device for w in weights.values()} == {torch.device("cuda", gpu)}
        on_cpu = reshard.load_rank(out, rank, device="cpu")
        assert all(torch.equal(weights[k].cpu().view(torch.uint8), on_cpu[k].view(torch.uint8)) for k in weights)
    with pytest.raises(InputError, match=rf"torch sees {count} CUDA device"):
        reshard.load_rank(out, 0, device=f"cuda:{count}")


def test_single_device_communicator() -> None:
    comm = SingleDevice()
    x = torch.arange(6.0).reshape(2, 3)
    comm.all_reduce_sum(x)
    out = torch.empty(2, 3)
    comm.all_gather(x, out)
    assert torch.equal(out, x) and (comm.world_size, comm.rank) == (1, 0)
    comm.scatter(x, out)
    assert torch.equal(out, x)
    comm.barrier()


def _collectives(rank: int, world: int, init: str, backend: str, results: dict) -> None:
    comm = TorchDistributed.start(rank, world, init, backend=backend)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        x = torch.full((2, 3), float(rank + 1), device=device)
        comm.all_reduce_sum(x)
        gathered = torch.empty(2, 3 * world, device=device)
        comm.all_gather(torch.full((2, 3), float(rank), device=device), gathered, dim=1)
        scattered = torch.empty(2, 2, device=device)
        comm.scatter(torch.arange(4.0 * world, device=device).reshape(2, 2 * world) if rank == 0 else None, scattered, dim=1)
        comm.barrier()
        results[rank] = (x.cpu(), gathered.cpu(), scattered.cpu(), comm.world_size, comm.rank)
    finally:
        comm.close()


def run_collectives(tmp_path: Path, world: int, backend: str) -> dict:
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(
        _collectives, args=(world, f"file://{tmp_path / 'rendezvous'}", backend, results), nprocs=world, start_method="spawn"
    )
    return dict(results)


def check_collectives(results: dict, world: int) -> None:
    total = float(sum(range(1, world + 1)))
    for rank in range(world):
        x, gathered, scattered, size, me = results[rank]
        assert (size, me) == (world, rank)
        assert torch.equal(x, torch.full((2, 3), total))
        assert torch.equal(gathered, torch.cat([torch.full((2, 3), float(r)) for r in range(world)], dim=1))
        full = torch.arange(4.0 * world).reshape(2, 2 * world)
        assert torch.equal(scattered, full[:, 2 * rank : 2 * rank + 2])


def test_torch_distributed_communicator_gloo(tmp_path: Path) -> None:
    check_collectives(run_collectives(tmp_path, 2, "gloo"), 2)


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_torch_distributed_communicator_nccl(tmp_path: Path) -> None:
    check_collectives(run_collectives(tmp_path, 2, "nccl"), 2)

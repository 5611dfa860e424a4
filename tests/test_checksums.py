"""--checksum: what the manifest records (sha256, xxh128 or none), who checks it, and how merge and resplit hash
the rank files from the reads that feed their output."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reshard
from reshard import InputError
from reshard.formats.checksums import FileHash, HashedReader

from helpers import forge, invoke, snapshot, split, synthetic_llama

DIGESTS = {"sha256": lambda data: hashlib.sha256(data).hexdigest(), "xxh128": lambda data: xxhash.xxh3_128(data).hexdigest()}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return synthetic_llama(tmp_path / "model", torch.bfloat16, kv_heads=2, layers=2)


def records(folder: Path) -> dict[str, dict]:
    """Every file record of the folder: the manifest's and each rank record's."""
    found = dict(json.loads((folder / "reshard.json").read_text())["files"])
    for path in sorted(folder.glob("reshard-rank-*.json")):
        found |= json.loads(path.read_text())["files"]
    return found


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("checksum", ["sha256", "xxh128"])
def test_the_manifest_records_the_chosen_digest_of_every_file(model: Path, tmp_path: Path, checksum: str) -> None:
    out = split(model, tmp_path / "out", 2, "--checksum", checksum)
    assert json.loads((out / "reshard.json").read_text())["checksum"] == checksum
    files = records(out)
    assert sorted(files) == sorted(p.name for p in out.iterdir() if not p.name.startswith("reshard"))
    for name, record in files.items():
        data = (out / name).read_bytes()
        assert record == {"bytes": len(data), checksum: DIGESTS[checksum](data)}
    result = invoke("verify", out)
    assert result.exit_code == 0, result.stderr
    assert f"match the sizes and {checksum} in " in result.stdout


def test_checksum_none_records_sizes_only_and_still_checks_them(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "out", 2, "--checksum", "none")
    assert json.loads((out / "reshard.json").read_text())["checksum"] == "none"
    assert all(set(record) == {"bytes"} for record in records(out).values())
    result = invoke("verify", out)
    assert result.exit_code == 0 and "match the sizes (no checksums: split with --checksum none) in " in result.stdout
    merged = invoke("merge", out, "--out", tmp_path / "merged", "-q")
    assert merged.exit_code == 0, merged.stderr
    assert snapshot(tmp_path / "merged")["model.safetensors"] == (model / "model.safetensors").read_bytes()
    rank1 = out / "model-rank-1-part-0.safetensors"
    os.truncate(rank1, rank1.stat().st_size - 1)
    result = invoke("merge", out, "--out", tmp_path / "merged-2", "-q")
    assert result.exit_code == 1 and "the file is truncated or was changed" in result.stderr
    assert not (tmp_path / "merged-2").exists()


@pytest.mark.parametrize("checksum", ["sha256", "xxh128"])
def test_a_corrupt_rank_file_fails_merge_resplit_and_load_rank(model: Path, tmp_path: Path, checksum: str) -> None:
    out = split(model, tmp_path / "out", 2, "--checksum", checksum)
    rank1 = out / "model-rank-1-part-0.safetensors"
    corrupt(rank1)
    message = f"Error: {rank1}: {checksum} differs from reshard-rank-1.json; the file is corrupt, split again\n"
    for command, target in (("merge", "merged"), ("split", "resplit")):
        extra = ["--tp", "4"] if command == "split" else []
        result = invoke(command, out, *extra, "--out", tmp_path / target, "-q")
        assert (result.exit_code, result.stderr) == (1, message)
        assert not (tmp_path / target).exists()
    with pytest.raises(InputError, match=f"{checksum} differs from reshard-rank-1.json"):
        reshard.load_rank(out, 1, device="cpu")
    assert reshard.load_rank(out, 1, device="cpu", check_checksums=False)


def test_a_resplit_records_its_own_checksum(model: Path, tmp_path: Path) -> None:
    before = split(model, tmp_path / "before", 4, "--checksum", "sha256")
    after = split(before, tmp_path / "after", 2)
    direct = split(model, tmp_path / "direct", 2)
    assert snapshot(after) == snapshot(direct)
    assert json.loads((after / "reshard.json").read_text())["checksum"] == "xxh128"  # the default


def test_an_unknown_checksum_is_a_usage_error(model: Path, tmp_path: Path) -> None:
    result = invoke("split", model, "--tp", 2, "--out", tmp_path / "out", "--checksum", "md5")
    assert (result.exit_code, result.stderr) == (2, "Error: --checksum 'md5' is not one of sha256, xxh128, none\n")
    assert not (tmp_path / "out").exists()


def test_an_unknown_checksum_in_a_manifest_is_refused(model: Path, tmp_path: Path) -> None:
    out = split(model, tmp_path / "out", 2)
    manifest = out / "reshard.json"
    manifest.write_text(manifest.read_text().replace('"checksum": "xxh128"', '"checksum": "crc32"'))
    result = invoke("verify", out)
    assert result.exit_code == 1
    assert (
        result.stderr.startswith(f"Error: {manifest}: malformed manifest")
        and "checksum: must be one of sha256, xxh128, none" in result.stderr
    )


@pytest.mark.parametrize("tp", [2, 4])
def test_merge_reads_every_rank_byte_once_and_hashes_what_it_read(model: Path, tmp_path: Path, monkeypatch, tp: int) -> None:
    """Every byte of every rank file is read once: by the merge (into memory, or copied inside the kernel), or by
    the hash (a header, a replicated tensor's other copies). Bytes read into memory are hashed from that memory;
    only bytes copied inside the kernel are read again, from the page cache, to hash them."""
    out = split(model, tmp_path / "out", tp)
    rank_files = {str(p) for p in out.glob("model-rank-*.safetensors")}
    reads: dict[str, list[tuple[int, int, str]]] = {name: [] for name in rank_files}
    real_preadv, real_copy = os.preadv, os.copy_file_range

    def path_of(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def preadv(fd: int, buffers: list, offset: int) -> int:
        n = real_preadv(fd, buffers, offset)
        if path_of(fd) in reads:
            who = "hash" if threading.current_thread().name == "reshard-hash" else "engine"
            reads[path_of(fd)].append((offset, offset + n, who))
        return n

    def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        n = real_copy(src, dst, count, offset_src, offset_dst)
        if path_of(src) in reads:
            reads[path_of(src)].append((offset_src, offset_src + n, "copy"))
        return n

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    result = invoke("merge", out, "--out", tmp_path / "merged", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
    header_reads = {}
    for name, spans in reads.items():
        size = Path(name).stat().st_size
        engine = sorted((a, b) for a, b, who in spans if who != "hash")
        hashed = sorted((a, b) for a, b, who in spans if who == "hash")
        copied = [(a, b) for a, b, who in spans if who == "copy"]
        # the merge itself never reads a byte twice, and the hash never reads what was handed to it in memory
        read, in_kernel, by_hash = np.zeros(size, int), np.zeros(size, bool), np.zeros(size, int)
        for a, b in engine:
            read[a:b] += 1
        for a, b in copied:
            in_kernel[a:b] = True
        for a, b in hashed:
            by_hash[a:b] += 1
        assert read.max() == 1 and by_hash.max() == 1
        assert not ((read == 1) & ~in_kernel & (by_hash == 1)).any()
        assert ((read == 1) | (by_hash == 1)).all()  # every byte was read, and hashed
        header_reads[name] = [(a, b) for a, b in hashed if a == 0]
    assert all(spans for spans in header_reads.values())  # headers are hashed, though merge does not read them again


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=5000),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
    order=st.randoms(use_true_random=False),
    kinds=st.lists(st.sampled_from(["view", "follow", "skip"]), min_size=13, max_size=13),
)
def test_read_hash_covers_the_file_whatever_the_order_of_reads(tmp_path_factory, data, cuts, order, kinds) -> None:
    """Reads handed over in memory, copies followed in the page cache and stretches never read, in any order:
    the digest is always the file's."""
    path = tmp_path_factory.mktemp("file") / "data"
    path.write_bytes(data)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    stretches = list(zip(bounds, bounds[1:], kinds, strict=False))
    order.shuffle(stretches)
    fd = os.open(path, os.O_RDONLY)
    try:
        hashed = FileHash(fd, "sha256")
        for a, b, kind in stretches:
            if kind == "view":
                hashed.submit(a, memoryview(data[a:b])).wait()
            elif kind == "follow":
                hashed.follow(a, b - a)
        assert hashed.hexdigest(len(data)) == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(0, 40 << 20), min_size=1, max_size=12), order=st.randoms(use_true_random=False))
def test_a_written_file_is_hashed_whatever_the_order_of_writes(tmp_path: Path, cuts, order) -> None:
    """A file written in stretches by several writers in any order (as a split's threads write tensors): the hash
    follows the written prefix and the digest is the file's; its frontier says how much was written."""
    data = np.random.default_rng(len(cuts)).integers(0, 256, 40 << 20, dtype=np.uint8).tobytes()
    bounds = sorted({0, len(data), *cuts})
    stretches = list(zip(bounds, bounds[1:], strict=False))
    order.shuffle(stretches)
    path = tmp_path / "written"
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        hashed = FileHash(fd, "xxh128")
        for a, b in stretches:
            os.pwrite(fd, data[a:b], a)
            hashed.written(a, b - a)
        assert hashed.frontier == len(data)
        assert hashed.hexdigest(len(data)) == xxhash.xxh3_128(data).hexdigest()
    finally:
        os.close(fd)


def test_a_hashed_reader_keeps_each_read_until_it_is_hashed(tmp_path: Path) -> None:
    """A read's memory is reused only once its hash is done: three reads in flight, then the digest."""
    data = os.urandom(3 << 20)
    path = tmp_path / "data"
    path.write_bytes(data)
    with HashedReader(path, "xxh128") as reader:
        blocks = [reader.read(start, np.empty((2, 1 << 19), dtype=np.uint8)) for start in range(0, len(data), 1 << 20)]
        assert all(block.shape == (2, 1 << 19) for block in blocks)
        assert b"".join(bytes(block) for block in blocks) == data  # the three reads did not overwrite each other
        assert reader.hexdigest() == xxhash.xxh3_128(data).hexdigest()


def test_a_rank_file_cut_short_while_it_is_hashed_is_named(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    path = tmp_path / "model-rank-0-part-0.safetensors"
    path.write_bytes(data)
    with HashedReader(path, "sha256") as reader:
        reader.read(0, np.empty(1 << 20, dtype=np.uint8))
        os.truncate(path, 2 << 20)  # the rest, hashed at the end, is no longer there
        with pytest.raises(InputError, match=f"^{path}: file ended at byte {2 << 20} while hashing it; the file changed while being read"):
            reader.hexdigest()


def test_a_manifest_without_a_checksum_field_means_sha256(model: Path, tmp_path: Path) -> None:
    """Manifests written before --checksum existed have no "checksum": their records are sha256, and are checked."""
    out = split(model, tmp_path / "out", 2, "--checksum", "sha256")
    forge(out, lambda manifest: manifest.pop("checksum"))
    result = invoke("verify", out)
    assert result.exit_code == 0 and "match the sizes and sha256 in " in result.stdout
    corrupt(out / "model-rank-0-part-0.safetensors")
    result = invoke("merge", out, "--out", tmp_path / "merged", "-q")
    assert result.exit_code == 1 and "sha256 differs from reshard-rank-0.json" in result.stderr

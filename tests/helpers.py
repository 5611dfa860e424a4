"""Test helpers: synthetic Llama-shaped checkpoints of any dtype and reference cuts written independently of reshard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from reshard.cli import app

# A Llama layout the reference cuts in these tests are written against, independently of the rules files:
# (dim each rank's slice is taken along, or None when every rank gets the whole tensor).
LLAMA_CUT_DIMS = {
    "embed_tokens": 0,
    "lm_head": 0,
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "gate_proj": 0,
    "up_proj": 0,
    "o_proj": 1,
    "down_proj": 1,
}


def expected_dim(name: str) -> int | None:
    """The dim a Llama-family tensor is cut along by tensor-parallel engines; None when replicated."""
    module = name.split(".")[-2]
    if name.endswith(".bias") and module in ("o_proj", "down_proj"):
        return None
    return LLAMA_CUT_DIMS.get(module)


def reference_slice(tensor: torch.Tensor, name: str, rank: int, tp: int, kv_heads: int | None = None) -> torch.Tensor:
    """Rank r's part: torch.chunk along the cut dim; with fewer kv heads than ranks, k/v head r*kv//tp whole."""
    dim = expected_dim(name)
    if dim is None:
        return tensor
    if kv_heads is not None and kv_heads < tp and name.split(".")[-2] in ("k_proj", "v_proj"):
        head = rank * kv_heads // tp
        return torch.chunk(tensor, kv_heads, dim=0)[head]
    return torch.chunk(tensor, tp, dim=dim)[rank]


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes as stored, whatever its dtype (float8 and bfloat16 included)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of the dtype (NaNs included): a round trip must keep every bit, not every value."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * itemsize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def llama_config(heads: int = 8, kv_heads: int = 8, head_dim: int = 4, ffn: int = 48, vocab: int = 64, layers: int = 2) -> dict:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": heads * head_dim,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "num_hidden_layers": layers,
    }


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    ffn, vocab = config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (hidden,),
                f"{p}.self_attn.q_proj.weight": (q, hidden),
                f"{p}.self_attn.k_proj.weight": (kv, hidden),
                f"{p}.self_attn.v_proj.weight": (kv, hidden),
                f"{p}.self_attn.o_proj.weight": (hidden, q),
                f"{p}.post_attention_layernorm.weight": (hidden,),
                f"{p}.mlp.gate_proj.weight": (ffn, hidden),
                f"{p}.mlp.up_proj.weight": (ffn, hidden),
                f"{p}.mlp.down_proj.weight": (hidden, ffn),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def synthetic_llama(folder: Path, dtype: torch.dtype, seed: int = 0, **config_overrides: int) -> Path:
    config = llama_config(**config_overrides)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(shape, dtype, gen) for name, shape in llama_shapes(config).items()}
    return write_checkpoint(folder, tensors, config)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under a folder with its bytes, to prove inputs are left untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


runner = CliRunner()


def invoke(*args: object):
    """The reshard command, run in this process, with every argument as text."""
    return runner.invoke(app, [str(a) for a in args])


def split(model: Path, out: Path, tp: int, *flags: str) -> Path:
    """`reshard split MODEL --tp TP --out OUT -q FLAGS`, which must succeed."""
    result = invoke("split", model, "--tp", tp, "--out", out, "-q", *flags)
    assert result.exit_code == 0, result.stderr
    return out


def forge(folder: Path, change) -> None:
    """Edit a split folder's manifest and re-bind every rank record to it, as a careful forger would: only the
    checks of content, not of bookkeeping, can then refuse it."""
    import hashlib

    manifest = json.loads((folder / "reshard.json").read_text())
    change(manifest)
    text = json.dumps(manifest, indent=1)
    (folder / "reshard.json").write_text(text)
    for record_path in folder.glob("reshard-rank-*.json"):
        record = json.loads(record_path.read_text())
        record["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
        record_path.write_text(json.dumps(record))

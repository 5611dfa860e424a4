"""The usual tensor-parallel split script, for comparison: load the whole checkpoint, torch.chunk each tensor,
save one file per rank. Its peak memory is at least the model's size.

    python benchmarks/naive_split.py MODEL_DIR OUT_DIR TP
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
ROW = ("o_proj", "down_proj")


def main() -> None:
    model, out, tp = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    state = load_file(str(model / "model.safetensors"))
    out.mkdir(parents=True)
    for rank in range(tp):
        shard = {}
        for name, tensor in state.items():
            module = name.split(".")[-2]
            dim = 0 if module in COLUMN else 1 if module in ROW else None
            shard[name] = tensor if dim is None else torch.chunk(tensor, tp, dim=dim)[rank].contiguous()
        save_file(shard, str(out / f"model-rank-{rank}.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()

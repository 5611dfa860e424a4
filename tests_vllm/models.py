"""Tiny models of every model type with a vLLM layout, at sizes vLLM's CPU build runs (head_dim 32), and the
vLLM runs the proof makes on them: one start per model and load format, each capturing every rank's
parameters and buffers before `process_weights_after_loading` (the plugin in plugin/) and, where vLLM's CPU build
runs the model, its greedy tokens and prompt logprobs."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-config builder the main suite uses (torch and transformers only)

from families import tiny_config  # noqa: E402

SIZES = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
    vocab_size=1000, max_position_embeddings=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
)  # fmt: skip
MLA = dict(num_key_value_heads=8, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, head_dim=16)
DEEPSEEK = dict(MLA, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1)
# More model types of the llama layout, each with a vLLM class of its own.
LLAMA_LIKE = (
    "mistral",
    "olmo",
    "olmo3",
    "exaone4",
    "seed_oss",
    "smollm3",
    "arcee",
    "helium",
    "ministral",
    "nemotron",
    "ernie4_5",
    "hunyuan_v1_dense",
)
# What each model type's tiny checkpoint needs beyond SIZES.
MODELS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama"),
    **{t: dict(model_type=t) for t in LLAMA_LIKE},
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
    "gemma": dict(model_type="gemma", num_key_value_heads=1, tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral"),
    "qwen2_moe": dict(model_type="qwen2_moe"),
    "qwen3_moe": dict(model_type="qwen3_moe"),
    "olmoe": dict(model_type="olmoe", num_key_value_heads=8),
    "flex_olmo": dict(model_type="flex_olmo"),
    "exaone_moe": dict(model_type="exaone_moe", first_k_dense_replace=1, num_shared_experts=1),
    "hunyuan_v1_moe": dict(model_type="hunyuan_v1_moe"),
    "dots1": dict(model_type="dots1", n_shared_experts=1, first_k_dense_replace=1),
    "glm4_moe": dict(model_type="glm4_moe", head_dim=32, first_k_dense_replace=1, n_shared_experts=1, n_group=1, topk_group=1),
    "deepseek_v2": dict(DEEPSEEK, model_type="deepseek_v2"),
    "deepseek_v3": dict(DEEPSEEK, model_type="deepseek_v3", topk_method="noaux_tc"),
    "gpt_oss": dict(model_type="gpt_oss", intermediate_size=128, layer_types=["sliding_attention", "full_attention"]),
    "llama4_text": dict(
        model_type="llama4_text", num_experts_per_tok=1, intermediate_size=128, intermediate_size_mlp=512, interleave_moe_layer_step=2
    ),
    "phi3": dict(model_type="phi3"),
    "olmo2": dict(model_type="olmo2", num_key_value_heads=8),
    "granite": dict(model_type="granite"),
    "gemma2": dict(model_type="gemma2", tie_word_embeddings=True),  # vLLM's Gemma 2 has no lm_head of its own
    "gemma3_text": dict(model_type="gemma3_text"),
    "starcoder2": dict(model_type="starcoder2"),
    "qwen3_next": dict(
        model_type="qwen3_next",
        linear_num_key_heads=4,
        linear_num_value_heads=8,
        linear_key_head_dim=32,
        linear_value_head_dim=32,
        linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "full_attention"],
    ),
}


def build(kind: str, folder: Path) -> Path:
    """The tiny model, float32, random weights and norms (so a misplaced one shows), vocabulary 1000 (padded)."""
    from transformers import AutoModelForCausalLM

    spec = {"tie_word_embeddings": False, **MODELS[kind]}
    config = tiny_config(spec.pop("model_type"), spec, sizes=SIZES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    model.save_pretrained(folder)
    return folder


def _scheme(kind: str) -> dict[str, Any]:
    """A compressed-tensors W8A8 scheme as llm-compressor writes it: per-channel weight scales, dynamic per-token
    activation scales, symmetric."""
    args = dict(num_bits=8, type=kind, symmetric=True, group_size=None, block_structure=None, actorder=None, observer_kwargs={})
    return dict(
        targets=["Linear"],
        weights=dict(args, strategy="channel", dynamic=False, observer="minmax"),
        input_activations=dict(args, strategy="token", dynamic=True, observer=None),
        output_activations=None,
    )


QUANTIZED = {
    "llama-fp8": ("llama", "float"),  # compressed-tensors
    "llama-int8": ("llama", "int"),  # compressed-tensors
    "llama-fp8-tensor": ("llama", "fp8-tensor"),  # quant_method fp8, one scale per tensor
    "llama-fp8-static": ("llama", "fp8-static"),  # quant_method fp8, per-tensor scales, static activation scales (input_scale)
    "llama-fp8-block": ("llama", "fp8-block"),  # quant_method fp8, a scale per 32 x 128 block (weight_scale_inv)
}
BLOCK = (32, 128)  # rows (out) x columns (in): vLLM's CPU kernel takes column blocks of 128 only
FP8_MAX = 448.0


def build_quantized(kind: str, folder: Path) -> Path:
    """The tiny model with every linear layer of its decoder layers in compressed-tensors W8A8 (FP8 or INT8):
    `weight` in 8 bits, `weight_scale` [out, 1] in float32; embeddings, norms and lm_head unquantized."""
    from safetensors.torch import load_file, save_file

    base, number = QUANTIZED[kind]
    build(base, folder)
    tensors = load_file(folder / "model.safetensors")
    if in_bfloat16(number):
        tensors = {n: t.to(torch.bfloat16) for n, t in tensors.items()}
    linear = [n for n in tensors if ".layers." in n and n.endswith("_proj.weight")]
    for name in linear:
        w = tensors[name]
        if number in ("fp8-tensor", "fp8-static"):
            scale = w.abs().amax() / FP8_MAX
            tensors[name] = (w.float() / scale).to(torch.float8_e4m3fn)
            tensors[name[: -len("weight")] + "weight_scale"] = scale.float()
            if number == "fp8-static":
                tensors[name[: -len("weight")] + "input_scale"] = torch.rand(()) / 100 + 0.01
            continue
        if number == "fp8-block":
            rows, cols = w.shape
            blocks = w.float().reshape(rows // BLOCK[0], BLOCK[0], cols // BLOCK[1], BLOCK[1])
            scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
            tensors[name] = (blocks / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
            tensors[name[: -len("weight")] + "weight_scale_inv"] = scale.float()
            continue
        if number == "float":
            scale = w.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
            tensors[name] = (w / scale).to(torch.float8_e4m3fn)
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 127
            tensors[name] = torch.round(w / scale).clamp(-128, 127).to(torch.int8)
        tensors[name[: -len("weight")] + "weight_scale"] = scale.float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    if in_bfloat16(number):
        config["dtype"] = "bfloat16"
    if number.startswith("fp8"):
        scheme = "static" if number == "fp8-static" else "dynamic"
        config["quantization_config"] = dict(quant_method="fp8", activation_scheme=scheme, fmt="e4m3")
        if number == "fp8-block":
            config["quantization_config"]["weight_block_size"] = list(BLOCK)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder
    config["quantization_config"] = dict(
        quant_method="compressed-tensors",
        format=f"{number}-quantized",
        quantization_status="compressed",
        config_groups={"group_0": _scheme(number)},
        ignore=["lm_head"],
        kv_cache_scheme=None,
        global_compression_ratio=None,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def dtype_of(model: Path) -> str:
    """The dtype vLLM runs the model in: its unquantized tensors' (float32; bfloat16 where build_quantized says)."""
    return "bfloat16" if json.loads((model / "config.json").read_text()).get("dtype") == "bfloat16" else "float32"


def in_bfloat16(number: str) -> bool:
    """Whether vLLM's CPU build runs a quantized model only in bfloat16: quant_method fp8 always, and INT8 layers on
    a processor with AMX tiles (vLLM then runs them with its AMX kernel, whose activations must be bfloat16 or half)."""
    return number.startswith("fp8") or (number == "int" and torch.cpu._is_amx_tile_supported())


def make(kind: str, folder: Path) -> Path:
    """The tiny checkpoint of a model type, or of a quantized one (QUANTIZED)."""
    return build_quantized(kind, folder) if kind in QUANTIZED else build(kind, folder)


def block_scaled(model: Path) -> bool:
    """FP8 with block scales, whose layers vLLM's CPU build constructs only on processors with AMX tiles."""
    config = json.loads((model / "config.json").read_text())
    return "weight_block_size" in config.get("quantization_config", {})


class Host:
    """The vLLM host (host.py): one process for every vLLM start of a session, started on first use and again
    after a job it did not answer in time. Its output goes to LOG."""

    def __init__(self, log: Path) -> None:
        self.log, self.process, self.answers = log, None, None
        self.starts: list[tuple[str, float]] = []  # (what was started, seconds) for the session's summary

    def start(self) -> None:
        read, write = os.pipe()
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in the host itself
            "PYTHONPATH": os.pathsep.join([str(HERE / "plugin"), os.environ.get("PYTHONPATH", "")]),
        }
        with open(self.log, "a") as f:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "host.py"), str(write)],
                stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env, text=True, pass_fds=[write], start_new_session=True,
            )  # fmt: skip
        os.close(write)
        self.answers = os.fdopen(read)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def run(self, job: dict[str, Any], timeout: float = 600) -> tuple[dict[str, Any], str]:
        """The host's answer to one job and what vLLM printed for it."""
        if self.process is None or self.process.poll() is not None:
            self.start()
        assert self.process is not None and self.process.stdin is not None and self.answers is not None
        offset, began = self.log.stat().st_size, time.time()
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.answers], [], [], timeout)
        line = self.answers.readline() if ready else ""
        self.starts.append((f"{Path(job['model']).name} ({job['load_format']})", time.time() - began))
        remove_shared_memory(since=began)
        with open(self.log) as f:
            f.seek(offset)
            printed = f.read()
        if not line:
            self.stop()
            raise AssertionError(f"the vLLM host did not answer within {timeout} s\n{printed[-4000:]}")
        return json.loads(line), printed


def remove_shared_memory(*, since: float) -> None:
    """vLLM's CPU build leaves its shared-memory segments (its message queues' psm_*, its TP communicator's
    vllm_dist_*) in /dev/shm once an engine has shut down: remove those made since the job began."""
    shm = Path("/dev/shm")
    for path in shm.glob("*") if shm.is_dir() else ():
        try:
            if path.name.startswith(("psm_", "vllm_dist_")) and path.stat().st_mtime >= since:
                path.unlink()
        except OSError:
            pass  # gone already, or another user's


HOST = Host(Path(tempfile.mkdtemp(prefix="reshard-vllm-")) / "host.log")
atexit.register(HOST.stop)


def run_vllm(model: Path, tp: int, load_format: str, out: Path, *, generate: bool = True) -> tuple[list[dict] | None, str]:
    """Start vLLM on `model` (in the host); `out` gets the capture (rank-<r>.safetensors), the log and the tokens
    (when generating). For FP8 block scales without AMX, the capture plugin pretends AMX tiles are there and stops
    the run once the weights are loaded (nothing is computed)."""
    out.mkdir(parents=True, exist_ok=True)
    amx = block_scaled(model)
    generate = generate and not amx
    env = {
        "RESHARD_CAPTURE": str(out),
        "RESHARD_CAPTURE_PRETEND_AMX": "1" if amx else None,
        "RESHARD_CAPTURE_STOP": None if generate else "1",  # nothing is computed: the run ends once the weights are captured
        "VLLM_CPU_OMP_THREADS_BIND": "|".join(["0", "1"] * (tp // 2)) if tp > 1 else None,
    }
    job = dict(model=str(model), tp=tp, load_format=load_format, dtype=dtype_of(model), out=str(out), generate=generate, env=env)
    answer, printed = HOST.run(job)
    (out / "vllm.log").write_text(printed)
    assert answer["ok"], f"{answer['error']}\n{printed[-4000:]}"
    return (json.loads((out / "tokens.json").read_text()) if generate else None), printed


if __name__ == "__main__":
    # python tests_vllm/models.py ROOT TP [--load-only] KIND...: build each model and capture vLLM's load of it, to
    # read a new layout off vLLM (ROOT/KIND-capture-tpTP/rank-R.safetensors).
    root, tp, kinds = Path(sys.argv[1]), int(sys.argv[2]), [k for k in sys.argv[3:] if k != "--load-only"]
    for kind in kinds:
        run_vllm(make(kind, root / kind), tp, "auto", root / f"{kind}-capture-tp{tp}", generate="--load-only" not in sys.argv)

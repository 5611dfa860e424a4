"""A vLLM host: one process that imports vLLM once, then starts it on one model after another.

    python tests_vllm/host.py RESULT_FD

Each job is a JSON line on stdin: {"model", "tp", "load_format", "dtype", "out", "generate", "env"}. The host sets
the job's environment, starts a fresh `LLM` (vLLM's own engine, executor, workers and loaders), greedily generates
8 tokens with prompt logprobs for two prompts into OUT/tokens.json when "generate" is set, and shuts it down. A
line `{"ok": ..., "error": ...}` on RESULT_FD answers each job; everything vLLM prints goes to stdout, each job's
part after a line `reshard-vllm-host: job <out>`.

vLLM's CPU platform starts its worker processes with `spawn`, each of which imports vLLM again: 7 of the 16 s of a
start that only loads the weights, here. The host starts them with `fork`, as vLLM does on GPUs, so they begin
with vLLM imported; a load then takes about a second.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

PROMPTS = [[3, 17, 101, 7, 249, 64, 9, 500], [200, 1, 45, 45, 99, 12, 180, 999]]


def fork_workers() -> None:
    """vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn while it checks each config; set it back."""
    from vllm.platforms import cpu

    check = cpu.CpuPlatform.check_and_update_config.__func__  # type: ignore[attr-defined]

    def check_then_fork(cls: Any, vllm_config: Any) -> None:
        check(cls, vllm_config)
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    cpu.CpuPlatform.check_and_update_config = classmethod(check_then_fork)  # type: ignore[method-assign,assignment]


def run(job: dict[str, Any]) -> None:
    from vllm import LLM, SamplingParams, envs
    from vllm.inputs import TokensPrompt

    envs.disable_envs_cache()  # vLLM caches its environment once an engine has started
    for name, value in job["env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        llm = LLM(
            model=job["model"],
            tensor_parallel_size=job["tp"],
            load_format=job["load_format"],
            dtype=job["dtype"],
            enforce_eager=True,
            skip_tokenizer_init=True,
            max_model_len=64,
            seed=0,
            distributed_executor_backend="mp" if job["tp"] > 1 else None,
        )
    except Exception as e:
        if job["generate"]:
            raise
        print(f"vLLM stopped after loading the weights: {e!r}")  # the capture plugin has written them
        return
    try:
        if job["generate"]:
            params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, detokenize=False)
            results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
            found = []
            for prompt, result in zip(PROMPTS, results, strict=True):
                logprobs = [None if e is None else e[token].logprob for token, e in zip(prompt, result.prompt_logprobs, strict=True)]
                found.append({"tokens": list(result.outputs[0].token_ids), "prompt_logprobs": logprobs})
            Path(job["out"], "tokens.json").write_text(json.dumps(found))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def main() -> None:
    answers = os.fdopen(int(sys.argv[1]), "w")
    import vllm  # noqa: F401  (once, before any job)

    fork_workers()
    for line in sys.stdin:
        job = json.loads(line)
        print(f"reshard-vllm-host: job {job['out']}", flush=True)
        try:
            run(job)
            answer = {"ok": True, "error": None}
        except BaseException:
            answer = {"ok": False, "error": traceback.format_exc()}
        sys.stdout.flush()
        sys.stderr.flush()
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()

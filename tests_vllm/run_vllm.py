"""Start a real vLLM (CPU build) on a model folder and write its greedy tokens and prompt logprobs as JSON.

    python tests_vllm/run_vllm.py MODEL TP LOAD_FORMAT DTYPE OUT.json [--load-only]

With --load-only it stops once the weights are loaded (for models vLLM's CPU build loads but cannot run).

Run in its own process: vLLM starts worker processes and keeps global state.
"""

from __future__ import annotations

import json
import sys

PROMPTS = [[3, 17, 101, 7, 249, 64, 9, 500], [200, 1, 45, 45, 99, 12, 180, 999]]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, tp, load_format, dtype, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    load_only = "--load-only" in sys.argv[6:]
    try:
        llm = LLM(
            model=model,
            tensor_parallel_size=tp,
            load_format=load_format,
            dtype=dtype,
            enforce_eager=True,
            skip_tokenizer_init=True,
            max_model_len=64,
            seed=0,
            distributed_executor_backend="mp" if tp > 1 else None,
        )
    except Exception as e:
        if not load_only:
            raise
        print(f"vLLM stopped after loading the weights: {e!r}")  # the capture plugin has written them
        return
    if load_only:
        return
    params = SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=0, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params)
    found = []
    for prompt, result in zip(PROMPTS, results, strict=True):
        logprobs = [None if entry is None else entry[token].logprob for token, entry in zip(prompt, result.prompt_logprobs, strict=True)]
        found.append({"tokens": list(result.outputs[0].token_ids), "prompt_logprobs": logprobs})
    with open(out, "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main()

"""Rebuild examples/tiny-llama: a randomly initialised 2-layer Llama with GQA (8 heads, 4 kv heads), bf16.

pip install "torch>=2.4" transformers
python examples/make_tiny_llama.py
"""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

OUT = Path(__file__).parent / "tiny-llama"


def main() -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(OUT)
    (OUT / "generation_config.json").unlink(missing_ok=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""Session fixtures: tiny random models built and saved by transformers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from families import build, model_types, tiny_config

TRANSFORMERS_MODELS = {
    "llama": dict(model_type="llama", num_attention_heads=8, num_key_value_heads=4),
    "mistral": dict(model_type="mistral", num_attention_heads=8, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_attention_heads=8, num_key_value_heads=4),  # q/k/v biases
    "qwen3": dict(model_type="qwen3", num_attention_heads=8, num_key_value_heads=4, head_dim=16),  # q_norm, k_norm
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random models saved by transformers: `<family>` as one file, `<family>-sharded` with an index."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    paths = {}
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)
    for name, spec in TRANSFORMERS_MODELS.items():
        spec = dict(spec)
        config = tiny_config(spec.pop("model_type"), dict(spec, tie_word_embeddings=False), sizes=sizes)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
        model.save_pretrained(root / name)
        model.save_pretrained(root / f"{name}-sharded", max_shard_size="40KB")
        paths[name] = root / name
        paths[f"{name}-sharded"] = root / f"{name}-sharded"
    return paths


GPT2 = dict(n_embd=64, n_head=8, n_layer=2, vocab_size=257)


class FamilyModels(Mapping[str, Path]):
    """A tiny random checkpoint of every model type a built-in family claims, each built the first time a test asks
    for it: a run of a few tests builds only their models."""

    def __init__(self, root: Path) -> None:
        self.root, self.types, self.built = root, model_types(), dict[str, Path]()

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            if name not in self.types:
                raise KeyError(name)
            self.built[name] = build(name, self.root / name, GPT2 if name == "gpt2" else None)
        return self.built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.types)

    def __len__(self) -> int:
        return len(self.types)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> FamilyModels:
    return FamilyModels(tmp_path_factory.mktemp("families"))

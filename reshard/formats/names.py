"""The names of the files reshard reads and writes: a checkpoint's, transformers' style, and a split folder's."""

from __future__ import annotations

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MANIFEST_NAME = "reshard.json"
# What a manifest may record of every file beside its size (formats/checksums.py computes them). The default,
# XXH3-128, catches a corrupted or truncated file at many times sha256's speed; sha256 is for a manifest kept
# apart from the files it vouches for, where a forger could rewrite the files but not it.
NONE = "none"
CHECKSUMS = ("sha256", "xxh128", NONE)
DEFAULT_CHECKSUM = "xxh128"
EARLIER_CHECKSUM = "sha256"  # what a manifest that does not say recorded (written before the choice existed)
# What an engine starts from besides the weights and config.json, copied beside an engine layout's rank files.
ENGINE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "preprocessor_config.json",
)


def rank_file_name(rank: int, *, part: int = 0) -> str:
    """The name vLLM's sharded-state loader looks for."""
    return f"model-rank-{rank}-part-{part}.safetensors"


def rank_record_name(rank: int) -> str:
    """The sizes and sha256 of one rank's files, beside them: written last, so it marks the rank complete."""
    return f"reshard-rank-{rank}.json"


def merged_file_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, or model-00001-of-00003.safetensors and so on."""
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]

"""Files: safetensors headers, streaming writers and reads; checkpoints; split folders (manifest, checksums, and
the one reader that checks them)."""

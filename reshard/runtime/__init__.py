"""Running split weights: load_rank, the communicator between ranks, and `verify --forward`. Needs torch
(`pip install reshard[torch]`), imported only when these are used."""

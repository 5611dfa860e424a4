"""Running split weights: load_rank, the communicator between ranks, and `verify --forward`. Needs torch
(the torch extra: `pip install -e ".[torch]"`), imported only when these are used."""

"""One module per DVC stage: `run` (params and paths in, metrics out) and a CLI command."""

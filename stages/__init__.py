"""One module per DVC stage: a `run` function (params and paths in, metrics out) and a CLI command."""

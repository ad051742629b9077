"""KV sidecar (seed 003, FMKVC): stages `trajectories` and `sidecar`."""

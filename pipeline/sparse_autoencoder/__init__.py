"""Sparse autoencoders (seed 002): stages `activations` and `sae`."""

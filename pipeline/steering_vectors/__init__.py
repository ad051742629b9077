"""Learned steering vectors (seed 004): stages `mcdata` and `steering`."""

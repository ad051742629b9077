"""Concept directions (seeds 000, 001): stages `directions`, `distill`, `evaluate`."""

"""Activation distillation: cache language-model activations, train small models on them."""

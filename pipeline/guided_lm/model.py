"""The guided LM: a tiny LlamaForCausalLM built from its config (random init) and the
auxiliary linear map from its hidden state to the teacher's direction space.

    lm = build_lm(params, vocab_size=32000, seed=0)          # same seed, same weights
    aux = build_aux_map(params.d_model, dim=384, seed=0)     # own RNG: lm's init untouched
    loss = cosine_loss(aux(hidden), targets)                 # mean 1 - cos, (M, D) each
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.guided_lm.params import GuidedLmParams

MAX_POSITIONS = 4096
AUX_SEED_OFFSET = 1_000_003
"""The aux map's init seed is the cell's seed plus this, in a forked RNG."""


def lm_config(params: GuidedLmParams, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params.d_model,
        intermediate_size=params.ffn_dim,
        num_hidden_layers=params.num_layers,
        num_attention_heads=params.num_heads,
        num_key_value_heads=params.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )


def build_lm(params: GuidedLmParams, vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A randomly initialised causal LM; `seed` alone fixes its weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(lm_config(params, vocab_size))
    return model.float()


def build_aux_map(d_model: int, dim: int, seed: int) -> nn.Linear:
    """d_model -> dim, initialised from its own RNG so building it changes nothing else."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + AUX_SEED_OFFSET)
        return nn.Linear(d_model, dim)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def cosine_loss(predicted: Tensor, target: Tensor) -> Tensor:
    """Mean of 1 - cos over rows; (M, D) each, M > 0."""
    return (1 - F.cosine_similarity(predicted, target, dim=-1)).mean()

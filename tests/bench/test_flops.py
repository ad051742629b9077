"""bench/flops.py: hand-computed FLOP counts of a tiny config, and recorded shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from bench.flops import layer_flops, layer_weights, lm_head_flops, record_work, required_flops

# hidden 8, 2 heads of 4, 1 KV head, MLP 16, vocab 10.
TINY = Qwen3Config(
    vocab_size=10,
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=4,
    tie_word_embeddings=True,
)


def test_counts_match_a_hand_computation():
    # q, o: 8 x (2 x 4) each; k, v: 8 x (1 x 4) each -> 8*4*(2+2+1+1) = 192; MLP 3*8*16 = 384.
    assert layer_weights(TINY) == 576
    # 2 rows of 3 new tokens over 5 keys: 2*576*6 projections + 4*(2*4)*6*5 attention.
    assert layer_flops(TINY, batch=2, new=3, context=5) == 6912 + 960
    assert lm_head_flops(TINY, tokens=6) == 2 * 8 * 10 * 6
    # Prompts of 2 and 3 tokens through 2 layers: 1152 per token, causal 1+2 and 1+2+3 keys.
    assert required_flops(TINY, [2, 3], layers=2) == 2 * ((2304 + 96) + (3456 + 192))


def test_recorded_work_is_what_ran_padding_and_cached_context_included():
    model = Qwen3ForCausalLM(TINY).eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    with torch.no_grad(), record_work(model) as work:
        model(input_ids=ids, attention_mask=mask)
    assert work.layer_calls == [(2, 3, 3), (2, 3, 3)]
    assert work.head_tokens == 6
    executed = work.flops(TINY)
    assert executed == 2 * layer_flops(TINY, 2, 3, 3) + lm_head_flops(TINY, 6)
    # The padded row's third token ran: more than the 2 + 3 real tokens require.
    assert executed > required_flops(TINY, [3, 2], layers=2) + lm_head_flops(TINY, 5)

    # A batch continuing a cached 4-token prefix attends to 4 + 2 keys.
    base = model.model
    with torch.no_grad():
        cache = DynamicCache(config=TINY)
        base(input_ids=torch.tensor([[1, 2, 3, 4]]), cache=cache, use_cache=True)
        with record_work(base) as work:
            base(input_ids=torch.tensor([[5, 6]]), cache=cache, use_cache=True)
    assert work.layer_calls == [(1, 2, 6), (1, 2, 6)]
    assert work.head_tokens == 0  # a base model has no LM head


def test_a_model_without_decoder_blocks_is_refused():
    with pytest.raises(ValueError, match="cannot find the transformer blocks of Linear"):
        with record_work(nn.Linear(2, 2)):
            pass

"""The `activations` artifact (kind "activations"), written by stage `activations`.

Token-level hidden states over corpus chunks, one row per kept token:
    shard: chunk_id int64 (R,), position int64 (R,), token_id int64 (R,), layer_<L> (R, D)
    extra: model, revision, layers, hidden_size, positions, chunk_tokens, num_chunks,
           pad_token_id, storage_dtype
"""

from __future__ import annotations

ACTIVATIONS = "activations"

"""The `trajectories` artifact's tensor names, shared by its writer and its readers.

A folder of safetensors shards plus `manifest.json` (`pipeline/common/shards.py`);
the manifest's `extra` carries the sizes a reader needs.

trajectories (kind "trajectories"), written by stage `trajectories`; a chunk is
start_tokens dense prefix tokens (the corpus's start token, not stored: every compressor
keeps them), num_windows * window_size window tokens and num_queries future tokens:
    shard: chunk_id int64 (R,) and, for every stored layer L,
      layer<L>.keys     (R, W*S, n_kv_heads, head_dim)  K as attention consumes it
      layer<L>.values   (R, W*S, n_kv_heads, head_dim)
      layer<L>.queries  (R, Q, n_heads, head_dim)       future queries
      force space "hidden" (the seed's layout):
        layer<L>.force_hidden   (R, W*S, hidden_size)    dL/d(hidden state entering layer L)
        layer<L>.force_queries  (R, Q, n_heads * head_dim)
      force space "kv" (head space, far smaller):
        layer<L>.force_keys     (R, W*S, n_kv_heads, head_dim)   dL/dK
        layer<L>.force_values   (R, W*S, n_kv_heads, head_dim)   dL/dV
        layer<L>.force_queries  (R, Q, n_heads, head_dim)        dL/dQ
    extra: model, revision, layers, n_heads, n_kv_heads, head_dim, hidden_size,
           window_size, num_windows, num_queries, start_tokens (absent before: 0),
           force_space, rope ("after"),
           kv_head_of_query_head (list: query head h reads KV head h // group)
"""

from __future__ import annotations

TRAJECTORIES = "trajectories"


def trajectory_key(layer: int, name: str) -> str:
    """e.g. trajectory_key(3, "keys") -> "layer3.keys"."""
    return f"layer{layer}.{name}"


def kv_head_of_query_head(n_heads: int, n_kv_heads: int) -> list[int]:
    """Grouped-query attention: consecutive query heads share one KV head."""
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    group = n_heads // n_kv_heads
    return [h // group for h in range(n_heads)]

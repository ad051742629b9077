"""A table that holds the rows of some token ids only: the sorted ids, and a token's row
found by binary search, so a table's size follows the tokens used, not the vocabulary.

    ids = torch.tensor([5, 7, 49000])                       # sorted, unique
    table_index(ids, torch.tensor([[7, 49000]]), mask, "the LM's vocabulary")  # [[1, 2]]
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_sorted_ids(token_ids: Tensor) -> None:
    if token_ids.dim() != 1:
        raise ValueError(f"embedding token_ids must be (V,), got {tuple(token_ids.shape)}")
    if token_ids.numel() > 1 and not bool((token_ids[1:] > token_ids[:-1]).all()):
        raise ValueError("embedding token_ids must be sorted and unique for searchsorted")


def table_index(token_ids: Tensor, tokens: Tensor, mask: Tensor, table: str) -> Tensor:
    """Row of each token id (B, T) in a table of the sorted `token_ids` (V,), by binary
    search; padded positions (mask False) may hold any id. A real token absent from it is
    an error: "token ids [..] are not in `table`"."""
    index = torch.searchsorted(token_ids, tokens).clamp(max=token_ids.numel() - 1)
    missing = mask & (token_ids[index] != tokens)  # (B, T)
    if bool(missing.any()):
        absent = torch.unique(tokens[missing])[:10].tolist()
        raise ValueError(f"token ids {absent} are not in {table}")
    return index

"""Exemplars per SAE feature and their coherence.

`TopExemplars` keeps, for every feature, the k items with the largest positive
activation seen so far; it is fed streamed batches (codes and their items side
by side), so its result does not depend on batch order or shuffling. A feature's
*coherence* is the mean pairwise cosine between its exemplars' inputs (centered
at the data mean): an automatic proxy for "the top items look alike", used to
pick the most and least interpretable features for the report.

    top = TopExemplars(features=256, k=5)
    for batch in source.batches("all", 256, 4096, shuffle=False): top.update(z, batch.items)
    scores = coherence(top, vectors, keys, center)  # (F,)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.sparse_autoencoder.sources import item_keys


class TopExemplars:
    def __init__(self, features: int, k: int):
        self.k = k
        self.values = torch.full((features, k), -math.inf)  # (F, k) descending
        self.items = torch.full((features, k, 2), -1, dtype=torch.long)  # (F, k, 2)

    def update(self, z: Tensor, items: Tensor) -> None:
        """Merge codes z (B, F) of `items` (B, 2); only positive activations count."""
        z, items = z.detach().float().cpu(), items.cpu()
        candidates = torch.where(z > 0, z, -math.inf).T  # (F, B)
        merged = torch.cat([self.values, candidates], dim=1)  # (F, k + B)
        k = min(self.k, merged.shape[1])
        values, index = merged.topk(k, dim=1)  # (F, k)
        kept = index < self.k
        old = self.items.gather(1, index.clamp(max=self.k - 1)[..., None].expand(-1, -1, 2))
        new = items[(index - self.k).clamp(min=0)]  # (F, k, 2)
        self.items = torch.where(kept[..., None], old, new)
        self.values = values

    @property
    def valid(self) -> Tensor:
        """(F, k) True where an exemplar exists (the feature fired on that many items)."""
        return torch.isfinite(self.values)


def coherence(
    exemplars: TopExemplars, vectors: Tensor, keys: Tensor, center: Tensor, block: int = 512
) -> Tensor:
    """Mean pairwise cosine of each feature's exemplar inputs (F,); NaN under 2 exemplars.

    `vectors` (U, D) are the inputs of the items with `keys` (U,) (see `item_keys`),
    as the SAE sees them; `center` (D,) is subtracted first.
    """
    unit = torch.nn.functional.normalize(vectors.double() - center.double(), dim=1)  # (U, D)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    features, k = exemplars.values.shape
    out = torch.full((features,), math.nan, dtype=torch.float64)
    for start in range(0, features, block):
        valid = exemplars.valid[start : start + block]  # (b, k)
        found = item_keys(exemplars.items[start : start + block].reshape(-1, 2))
        where = torch.searchsorted(sorted_keys, found).clamp(max=max(len(keys) - 1, 0))
        rows = unit[order[where]].reshape(valid.shape[0], k, -1)  # (b, k, D)
        gram = rows @ rows.transpose(1, 2)  # (b, k, k)
        pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(k, dtype=torch.bool)
        count = pair.sum((1, 2))
        mean = (gram * pair).sum((1, 2)) / count.clamp(min=1)
        out[start : start + block] = torch.where(count > 0, mean, math.nan)
    return out

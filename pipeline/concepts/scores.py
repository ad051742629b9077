"""Evaluation metrics for the concept-direction students: pure tensor functions.

Everything is computed in float64, so a mean over tens of thousands of rows does
not drift, and an empty subset gives `None` (written as JSON `null`), never NaN.

    cos = mean_cosine(pred, target)                       # float | None
    hits = top_k_hit_rates(pred, target, ks=(1, 10))      # {1: 0.42, 10: 0.91}
    seen = token_coverage(offsets, flat, train_ids)       # (N,) bool
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.common.splits import SPLITS

EPS = 1e-8
CHUNK = 1024
"""Query rows per similarity block: bounds memory at CHUNK x pool float64 values."""


def row_cosine(pred: Tensor, target: Tensor, eps: float = EPS) -> Tensor:
    """Cosine of each row pair (N, D), (N, D) -> (N,) float64; a zero row scores 0."""
    pred, target = pred.double(), target.double()
    dot = (pred * target).sum(1)
    return dot / (pred.norm(dim=1) * target.norm(dim=1)).clamp_min(eps)


def mean_or_none(values: Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def mean_cosine(pred: Tensor, target: Tensor, eps: float = EPS) -> float | None:
    """Mean row cosine; None for zero rows."""
    return mean_or_none(row_cosine(pred, target, eps))


def _unit(x: Tensor, eps: float = EPS) -> Tensor:
    x = x.double()
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


def retrieval_ranks(pred: Tensor, target: Tensor, rows: Tensor | None = None) -> Tensor:
    """Rank of each query's own target among ALL targets by cosine -> (Q,) int64, 0 = best.

    pred[i] belongs to target[i]. `rows` picks the query rows; the candidate pool
    stays the whole of `target`. Ties go to the lower index, as a stable sort would:
    a zero prediction (all cosines 0) then scores chance, k/N, not a perfect hit.
    """
    rows = torch.arange(pred.shape[0]) if rows is None else rows.long()
    candidates = _unit(target)  # (N, D)
    ranks = []
    for start in range(0, rows.numel(), CHUNK):
        chunk = rows[start : start + CHUNK]
        sims = _unit(pred[chunk]) @ candidates.T  # (Q, N)
        own = sims.gather(1, chunk[:, None])  # (Q, 1)
        before = torch.arange(sims.shape[1])[None, :] < chunk[:, None]  # (Q, N)
        ranks.append(((sims > own) | ((sims == own) & before)).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def hit_rates(ranks: Tensor, ks: Sequence[int]) -> dict[int, float | None]:
    """Fraction of queries whose own target ranks within the top k, per k."""
    return {k: mean_or_none((ranks < k).double()) for k in ks}


def top_k_hit_rates(
    pred: Tensor, target: Tensor, ks: Sequence[int], rows: Tensor | None = None
) -> dict[int, float | None]:
    """Top-k retrieval hit rate of `pred` rows (or the `rows` subset) against all of `target`."""
    return hit_rates(retrieval_ranks(pred, target, rows), ks)


def _owners(lengths: Tensor) -> Tensor:
    """Index of the concept that owns each flat token position -> (sum(lengths),)."""
    return torch.repeat_interleave(torch.arange(lengths.numel()), lengths)


def token_coverage(offsets: Tensor, flat_tokens: Tensor, train_ids: Tensor) -> Tensor:
    """(N,) bool: every token of concept i occurs in some train concept ("seen tokens").

    A student's own embedding only learns rows of tokens it saw in training, so
    on an unseen token it can only guess; this splits the test set accordingly.
    """
    num_concepts = offsets.numel() - 1
    owner = _owners(offsets[1:] - offsets[:-1])  # (T,)
    is_train = torch.zeros(num_concepts, dtype=torch.bool)
    is_train[train_ids.long()] = True
    vocab = int(flat_tokens.max()) + 1 if flat_tokens.numel() else 0
    seen_token = torch.zeros(vocab, dtype=torch.bool)
    seen_token[flat_tokens[is_train[owner]]] = True
    unseen = torch.zeros(num_concepts, dtype=torch.long)
    unseen.index_add_(0, owner, (~seen_token[flat_tokens]).long())
    return unseen == 0


def concept_embeddings(
    offsets: Tensor, flat_tokens: Tensor, table_ids: Tensor, table_rows: Tensor, concept_ids: Tensor
) -> Tensor:
    """Teacher input embedding of each concept: mean of its token rows -> (B, E) float64.

    `table_ids` (V,) sorted token ids with rows `table_rows` (V, E), as the
    directions folder stores them.
    """
    concept_ids = concept_ids.long()
    starts = offsets[concept_ids]
    lengths = offsets[concept_ids + 1] - starts  # (B,)
    owner = _owners(lengths)  # (P,)
    first = torch.cumsum(lengths, 0) - lengths  # (B,) first flat slot of each concept
    positions = starts[owner] + torch.arange(owner.numel()) - first[owner]
    tokens = flat_tokens[positions]
    index = torch.searchsorted(table_ids, tokens).clamp(max=max(table_ids.numel() - 1, 0))
    if owner.numel() and not bool((table_ids[index] == tokens).all()):
        absent = torch.unique(tokens[table_ids[index] != tokens])[:10].tolist()
        raise ValueError(
            f"token ids {absent} are not in the embedding table ({table_ids.numel()} rows)"
        )
    sums = torch.zeros(concept_ids.numel(), table_rows.shape[1], dtype=torch.float64)
    sums.index_add_(0, owner, table_rows[index].double())
    return sums / lengths.clamp_min(1)[:, None].double()


def train_mean_predict(train_directions: Tensor, num_rows: int, rel_tol: float = 1e-4) -> Tensor:
    """Baseline: every concept gets the mean train direction -> (num_rows, D) float64.

    Directions are centred on the train mean, so that mean is float32 rounding
    noise; a mean below `rel_tol` of the typical row norm is taken as the zero
    vector (cosine 0) rather than a random direction that scores by chance.
    """
    train = train_directions.double()
    mean = train.mean(0)
    if mean.norm() <= rel_tol * train.norm(dim=1).mean():
        mean = torch.zeros_like(mean)
    return mean.expand(num_rows, -1).clone()


def token_count_predict(train_counts: Tensor, train_directions: Tensor, counts: Tensor) -> Tensor:
    """Baseline: each concept gets the mean train direction of the train concepts with as
    many tokens as it has -> (N, D) float64; a count no train concept has gets the overall
    train mean (`train_mean_predict`). It reads nothing of the concept but its length, so
    it matches any student whose directions mostly encode where pooling lands (e.g. a
    decoder's attention sink at position 0 for one-token prompts).

    train_counts (T,) and counts (N,): token counts; train_directions (T, D).
    """
    train = train_directions.double()
    out = train_mean_predict(train, counts.numel())
    for count in counts.unique().tolist():
        same = train_counts == count
        if bool(same.any()):
            out[counts == count] = train[same].mean(0)
    return out


def knn_predict(
    query: Tensor, pool: Tensor, pool_directions: Tensor, k: int, exclude_self: bool = False
) -> Tensor:
    """Baseline: mean direction of the k pool rows nearest by cosine -> (Q, D) float64.

    query (Q, E) and pool (N, E) are teacher input embeddings; with `exclude_self`
    query i IS pool row i (the train split scored against itself) and is skipped.
    """
    if exclude_self and query.shape[0] != pool.shape[0]:
        raise ValueError(
            f"exclude_self needs query == pool, got {query.shape[0]} vs {pool.shape[0]} rows"
        )
    k = min(k, pool.shape[0] - int(exclude_self))
    if k <= 0:
        raise ValueError(f"knn needs at least one pool row besides the query, got {pool.shape[0]}")
    pool_unit, directions = _unit(pool), pool_directions.double()
    out = []
    for start in range(0, query.shape[0], CHUNK):
        sims = _unit(query[start : start + CHUNK]) @ pool_unit.T  # (Q, N)
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + start] = -torch.inf
        nearest = sims.topk(k, dim=1).indices  # (Q, k)
        out.append(directions[nearest].mean(1))
    return torch.cat(out) if out else torch.zeros(0, pool_directions.shape[1], dtype=torch.float64)


def split_metrics(
    preds: dict[str, Tensor], targets: dict[str, Tensor], test_seen: Tensor, ks: Sequence[int]
) -> dict[str, float | None]:
    """The flat score dict of one predictor over train/val/test.

    preds/targets map split -> (N, D) aligned rows; test_seen (N_test,) bool from
    `token_coverage`. Retrieval ranks each test prediction against every test target.
    """
    out = {f"{split}_cos": mean_cosine(preds[split], targets[split]) for split in SPLITS}
    train, test = out["train_cos"], out["test_cos"]
    out["gap"] = None if train is None or test is None else train - test
    cos = row_cosine(preds["test"], targets["test"])
    ranks = retrieval_ranks(preds["test"], targets["test"])
    for name, keep in (("", None), ("seen_", test_seen), ("unseen_", ~test_seen)):
        if keep is not None:
            out[f"test_{name}cos"] = mean_or_none(cos[keep])
        for k, rate in hit_rates(ranks if keep is None else ranks[keep], ks).items():
            out[f"test_{name}top{k}"] = rate
    return out


def mean_over_seeds(per_seed: Sequence[dict]) -> dict:
    """Key-wise mean of the seeds' metrics dicts; None where any seed has None."""
    keys = per_seed[0].keys()
    return {
        key: None
        if any(m[key] is None for m in per_seed)
        else sum(m[key] for m in per_seed) / len(per_seed)
        for key in keys
    }


def char_ngram_ridge_predict(
    texts: dict[str, list[str]],
    train_directions: Tensor,
    val_directions: Tensor,
    ngrams: tuple[int, int],
    alphas: Sequence[float],
) -> tuple[dict[str, Tensor], float]:
    """Baseline: a linear model of the same input as the character student. Counts of
    character n-grams (scikit-learn's `char_wb`: n-grams inside words padded by a space)
    fitted on the train texts, then ridge regression to the direction, the alpha of
    `alphas` with the best val mean cosine. Deterministic (no seeds). No intercept: the
    directions are centred on the train mean already, and without one the exact
    (Cholesky) solver takes the sparse counts as they are.

    `texts` maps split -> texts, with "train" and "val" aligned to the directions;
    returns (predictions per split (N, D) float64, the chosen alpha).
    """
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge

    vectorizer = CountVectorizer(analyzer="char_wb", ngram_range=ngrams, lowercase=False)
    train = vectorizer.fit_transform(texts["train"])
    counts = {split: vectorizer.transform(part) for split, part in texts.items()}
    target = train_directions.double().numpy()
    best = None
    for alpha in alphas:
        model = Ridge(alpha=alpha, fit_intercept=False, solver="cholesky").fit(train, target)
        val = mean_cosine(torch.from_numpy(model.predict(counts["val"])), val_directions)
        score = -math.inf if val is None else val
        if best is None or score > best[0]:
            best = (score, alpha, model)
    _, alpha, model = best
    preds = {split: torch.from_numpy(model.predict(x)).double() for split, x in counts.items()}
    return preds, alpha


@dataclass(frozen=True)
class AffineMap:
    """y = x @ weight + bias, fitted by least squares."""

    weight: Tensor  # (I, O) float64
    bias: Tensor  # (O,) float64

    def __call__(self, x: Tensor) -> Tensor:
        return x.double() @ self.weight + self.bias  # (N, O)


def fit_affine(inputs: Tensor, outputs: Tensor, ridge: float = 0.0) -> AffineMap:
    """Least squares inputs (N, I) -> outputs (N, O) with an intercept, in float64.

    Both sides are centred on their means, so the intercept is the output mean minus the
    mapped input mean and `ridge` (an L2 penalty, sqrt(ridge) * I rows appended to the
    system) never shrinks it. A rank-deficient system gets lstsq's minimum-norm solution
    (the `gelsd` driver on CPU).
    """
    x, y = inputs.double(), outputs.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    design, target = x - x_mean, y - y_mean
    if ridge > 0:
        design = torch.cat([design, ridge**0.5 * torch.eye(x.shape[1], dtype=torch.float64)])
        target = torch.cat([target, torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64)])
    driver = "gelsd" if design.device.type == "cpu" else None
    weight = torch.linalg.lstsq(design, target, driver=driver).solution  # (I, O)
    return AffineMap(weight, y_mean - x_mean @ weight)

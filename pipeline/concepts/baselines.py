"""The deterministic baselines of the concept table, per split: what a student must beat.

Train mean (every concept the mean train direction), train mean per token count (what a
position artefact would match), kNN in the teacher's input-embedding space, and the
bag-of-characters ridge (the character student's linear control); no seeds. Stages
`evaluate` and `cross_teacher` score them beside their students.

    splits = {split: data.load_split(split) for split in SPLITS}
    for name, (label, preds, frozen) in baseline_predictions(data, splits, params).items(): ...
"""

from __future__ import annotations

from torch import Tensor

from pipeline.concepts.comparison import CHAR_BASELINE, TOKEN_COUNT_BASELINE
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import EvaluateParams
from pipeline.concepts.scores import (
    char_ngram_ridge_predict,
    concept_embeddings,
    knn_predict,
    token_count_predict,
    train_mean_predict,
)

Splits = dict[str, tuple[Tensor, Tensor]]  # split -> (concept_ids (N,), directions (N, D))


def baseline_predictions(
    data: DirectionSet, splits: Splits, params: EvaluateParams
) -> dict[str, tuple[str, dict[str, Tensor], bool]]:
    """name -> (table label, predictions per split, needs the teacher's table)."""
    train_dirs, k = splits["train"][1], params.knn_k
    mean = {split: train_mean_predict(train_dirs, len(ids)) for split, (ids, _) in splits.items()}
    texts = {split: data.concept_texts(ids) for split, (ids, _) in splits.items()}
    chars, alpha = char_ngram_ridge_predict(
        texts, train_dirs, splits["val"][1], params.char_ngrams, params.ridge_alphas
    )
    low, high = params.char_ngrams
    return {
        "baseline_train_mean": ("Baseline: train mean", mean, False),
        TOKEN_COUNT_BASELINE: (
            "Baseline: train mean per token count",
            _by_token_count(data, splits),
            False,
        ),
        "baseline_knn": (f"Baseline: kNN k={k} (teacher embeddings)", _knn(data, splits, k), True),
        CHAR_BASELINE: (
            f"Baseline: char {low}-{high}-gram counts + ridge (alpha={alpha:g})",
            chars,
            False,
        ),
    }


def _by_token_count(data: DirectionSet, splits: Splits) -> dict[str, Tensor]:
    """The token-count baseline, counting the concept tokens the students read."""
    counts = {split: data.offsets[i + 1] - data.offsets[i] for split, (i, _) in splits.items()}
    train = (counts["train"], splits["train"][1])
    return {split: token_count_predict(*train, counts[split]) for split in splits}


def _knn(data: DirectionSet, splits: Splits, k: int) -> dict[str, Tensor]:
    """kNN in the teacher's input-embedding space; a train concept never votes for itself."""
    tables = (data.offsets, data.flat_tokens, data.embedding_token_ids, data.embedding_rows)
    emb = {split: concept_embeddings(*tables, ids) for split, (ids, _) in splits.items()}
    pool, pool_dirs = emb["train"], splits["train"][1]
    return {
        split: knn_predict(emb[split], pool, pool_dirs, k, exclude_self=split == "train")
        for split in splits
    }

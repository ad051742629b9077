"""The analogy set (stage `analogies`' output): its reader and 3CosAdd scoring.

An analogy a:b::c:d (walk:walked::jump:jumped) is four concept ids, a relation and a
split. 3CosAdd (Mikolov et al. 2013) answers it with
d* = argmax over every concept except a, b, c of cos(v, v_b - v_a + v_c), on
unit-normalised vectors; the "only-c" control (Linzen 2016) answers it with c's nearest
neighbour alone (same exclusions): when walked is simply walk's nearest neighbour, the
offset b - a explains nothing, and only-c scores as high as 3CosAdd.

    analogies = AnalogySet.read(Path("data/analogies/analogies.parquet"))
    scores = analogy_scores(vectors, analogies)   # vectors (N, D) indexed by concept id
    scores["test_3cosadd"], scores["test_only_c"], scores["relations"]["+ed"]

The auxiliary analogy loss of training on the train analogies:
`pipeline.concepts.training.AnalogyOffsetLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from pipeline.common.splits import SPLITS

ANALOGIES_FILE = "analogies.parquet"
STATS_FILE = "stats.json"
WORDS = ("a", "b", "c", "d")
SCHEMA = pa.schema(
    [pa.field(f"{w}_id", pa.int64(), nullable=False) for w in WORDS]
    + [pa.field(w, pa.string(), nullable=False) for w in WORDS]
    + [
        pa.field("relation", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)
SCORED_SPLITS = ("val", "test")
CHUNK = 1024
"""Analogies per similarity block: bounds memory at CHUNK x N values."""
EPS = 1e-8


def analogy_split(word_splits: Sequence[str]) -> str:
    """The split of an analogy, "with the concepts": test if any word is a test concept,
    train if all are train concepts, else val; so a loss on train analogies never reads a
    held-out concept, and a test analogy always asks about one."""
    for split in word_splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {list(SPLITS)}")
    if "test" in word_splits:
        return "test"
    return "train" if all(split == "train" for split in word_splits) else "val"


@dataclass(frozen=True)
class AnalogySet:
    ids: Tensor
    """(Q, 4) int64 concept ids a, b, c, d."""
    relations: tuple[str, ...]
    splits: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> AnalogySet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"analogy set not found: {path}; run `dvc repro analogies`")
        table = pq.read_table(path)
        missing = [name for name in SCHEMA.names if name not in table.column_names]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing; expected {SCHEMA.names}")
        ids = torch.stack(
            [torch.tensor(table.column(f"{w}_id").to_pylist(), dtype=torch.long) for w in WORDS],
            1,
        ).reshape(-1, 4)
        splits = tuple(table.column("split").to_pylist())
        unknown = sorted(set(splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"{path}: unknown splits {unknown}; known: {list(SPLITS)}")
        return cls(ids, tuple(table.column("relation").to_pylist()), splits)

    def __len__(self) -> int:
        return len(self.splits)

    def select(self, split: str, relation: str | None = None) -> Tensor:
        """Row indices (K,) of the analogies of `split` (and `relation`)."""
        keep = [
            i
            for i, (s, r) in enumerate(zip(self.splits, self.relations, strict=True))
            if s == split and (relation is None or r == relation)
        ]
        return torch.tensor(keep, dtype=torch.long)

    @property
    def relation_names(self) -> list[str]:
        """In order of first appearance (the stage writes them in params order)."""
        return list(dict.fromkeys(self.relations))

    def counts(self) -> dict[str, dict[str, int]]:
        """relation -> split -> number of analogies."""
        out = {r: dict.fromkeys(SPLITS, 0) for r in self.relation_names}
        for r, s in zip(self.relations, self.splits, strict=True):
            out[r][s] += 1
        return out


def _unit(x: Tensor) -> Tensor:
    """Unit rows in float32: the similarities only pick an argmax, and float32 halves the
    cost of scoring every seed of every row against all concepts."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def nearest_excluding(vectors: Tensor, queries: Tensor, exclude: Tensor) -> Tensor:
    """For each query (Q, D), the index (Q,) of the row of `vectors` (N, D) of highest
    cosine, rows `exclude` (Q, K) left out; ties go to the lowest index."""
    pool = _unit(vectors)  # (N, D)
    out = []
    for start in range(0, queries.shape[0], CHUNK):
        sims = _unit(queries[start : start + CHUNK]) @ pool.T  # (q, N)
        sims.scatter_(1, exclude[start : start + CHUNK], -torch.inf)
        out.append(sims.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def three_cos_add(vectors: Tensor, a: Tensor, b: Tensor, c: Tensor, exclude: bool = True) -> Tensor:
    """3CosAdd answers (Q,): argmax_v cos(v, u_b - u_a + u_c) over the rows of `vectors`
    (N, D), u the unit vectors; `exclude` leaves out a, b and c, as is standard (else b or
    c itself often wins)."""
    unit = _unit(vectors)
    query = unit[b] - unit[a] + unit[c]  # (Q, D)
    banned = torch.stack([a, b, c], 1) if exclude else torch.zeros(a.numel(), 0, dtype=torch.long)
    return nearest_excluding(vectors, query, banned)


def only_c(vectors: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """The control: c's nearest neighbour (Q,), a, b and c excluded as in 3CosAdd."""
    return nearest_excluding(vectors, vectors[c], torch.stack([a, b, c], 1))


def accuracy(answers: Tensor, d: Tensor) -> float | None:
    return float((answers == d).double().mean()) if d.numel() else None


def analogy_scores(
    vectors: Tensor, analogies: AnalogySet, splits: Sequence[str] = SCORED_SPLITS
) -> dict[str, Any]:
    """3CosAdd and only-c accuracy per split (`<split>_3cosadd`, `<split>_only_c`; None
    for an empty split) and per relation (`relations`: relation -> the same keys), with
    `vectors` (N, D) one row per concept id: all N concepts are candidates."""
    if len(analogies) and int(analogies.ids.max()) >= vectors.shape[0]:
        raise ValueError(
            f"analogy concept id {int(analogies.ids.max())} is out of range for "
            f"{vectors.shape[0]} concepts: was the analogy set built from this word list?"
        )
    # Only the scored splits' analogies are answered (train ones are for training).
    scored = torch.tensor([s in splits for s in analogies.splits], dtype=torch.bool)
    position = torch.cumsum(scored.long(), 0) - 1  # analogy row -> row among the scored
    a, b, c, d = analogies.ids[scored].unbind(1)
    answers = {"3cosadd": three_cos_add(vectors, a, b, c), "only_c": only_c(vectors, a, b, c)}

    def block(relation: str | None) -> dict[str, float | None]:
        out = {}
        for split in splits:
            rows = position[analogies.select(split, relation)]
            for name, ans in answers.items():
                out[f"{split}_{name}"] = accuracy(ans[rows], d[rows])
        return out

    return block(None) | {"relations": {r: block(r) for r in analogies.relation_names}}


def space(num_concepts: int, preds: dict[str, Tensor], ids: dict[str, Tensor]) -> Tensor:
    """One row per concept id (N, D) from per-split predictions and their concept ids."""
    dim = next(iter(preds.values())).shape[1]
    out = torch.zeros(num_concepts, dim, dtype=torch.float64)
    for split, pred in preds.items():
        out[ids[split]] = pred.double()
    return out

"""Stream activation rows, each with the item it came from, from either kind of dump.

Two sources share one interface, so the SAE never cares which it reads:

- `DirectionsSource`: the `directions` dump (`pipeline/concepts/layout.py`), one direction
  (activation - train mean) per concept; item = (concept_id, -1); eval rows are
  the val and test splits; an exemplar is the concept's text (wordlist parquet).
- `TokenSource`: the token-level `activations` dump (`pipeline/sparse_autoencoder/layout.py`), one
  hidden state per token; item = (chunk_id, position); eval rows are the chunks whose
  corpus block (which no document spans) a stable hash puts in the held-out share; an
  exemplar is a text span decoded from the corpus chunk, the activating token in [[brackets]].
  It leaves out the start rows `StartRows` names (attention sinks).

A row's vector and its item travel together through every shuffle (one
permutation indexes both), so exemplars stay aligned with their text.

    source = open_source(Path("data/activations"), layer=22, eval_fraction=0.1)
    for batch in source.batches("train", 256, 65_536, shuffle=True, seed=0): ...
    texts = source.describe(items, context_tokens=16)  # needs attach_texts(...) first
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from pipeline.common.shards import Manifest, ShardRecord, layer_key, read_shard
from pipeline.common.stream import stream_batches
from pipeline.concepts.layout import KIND as DIRECTIONS
from pipeline.concepts.layout import SPLIT_CODES
from pipeline.inputs.text_chunks import CorpusChunks, block_ids
from pipeline.sparse_autoencoder.layout import ACTIVATIONS

log = logging.getLogger(__name__)
Split = Literal["train", "eval", "all"]
# Knuth's multiplicative hash: ids spread evenly over [0, 2^32) whatever their pattern.
_HASH_MULTIPLIER = 2_654_435_761
_HASH_RANGE = 2**32
# Item keys pack (a, b) into one int64: a * 2^24 + (b + 1); positions stay below 2^24 - 1.
_KEY_SHIFT = 2**24


@dataclass(frozen=True)
class RowBatch:
    x: Tensor  # (B, D) float32
    items: Tensor  # (B, 2) int64: (concept_id, -1) or (chunk_id, position)
    is_eval: Tensor  # (B,) bool


def item_keys(items: Tensor) -> Tensor:
    """(N, 2) items -> (N,) int64 keys, unique per item, ordered like the items."""
    return items[:, 0] * _KEY_SHIFT + (items[:, 1] + 1)


SINK_NORM_RATIO = 5.0
"""A row whose norm exceeds this multiple of its shard's median row norm is a sink. SmolLM2
layer 15 over the plays: ordinary rows reach 1.4x the median (99.9th percentile), sinks
12x-165x; 9 of 40 chunks had one at position 1 (`<|endoftext|>` then `;` or a newline)."""


@dataclass(frozen=True)
class StartRows:
    """The rows the SAE leaves out (`sae.keep_start_rows`): attention sinks, whose norm
    dwarfs every other row's (SmolLM2 layer 15: ~21,000 at position 0 holding
    `<|endoftext|>`, ~23,000 there without it, ~14,000 at an `<|endoftext|>` mid-chunk where
    the next document starts, up to ~24,700 at the first token after it; ~150-200 elsewhere)."""

    positions: int = 0
    """Each chunk's first this-many positions."""
    token_ids: tuple[int, ...] = ()
    """Rows holding one of these tokens anywhere: the start token again where a document
    starts inside a chunk."""
    norm_ratio: float | None = None
    """Rows whose norm exceeds this multiple of their shard's median row norm, wherever they
    are (a sink the model puts on the token after the start token); None: no norm rule."""

    @classmethod
    def of(cls, extra: dict, keep: bool) -> StartRows:
        """From an activations manifest's `extra`: nothing when `keep`; else the chunk's start
        tokens (`start_tokens`, copied from the corpus manifest; 0 when it predates the key)
        and at least position 0, a sink whether or not it holds a start token, and the start
        tokens' ids wherever they recur (`start_token_ids`)."""
        if keep:
            return cls()
        positions = max(int(extra.get("start_tokens", 0)), 1)
        token_ids = tuple(int(i) for i in extra.get("start_token_ids", ()))
        return cls(positions, token_ids, SINK_NORM_RATIO)

    def kept(self, position: Tensor, token_id: Tensor, x: Tensor) -> Tensor:
        """(R,) bool: which of the R rows (one shard's: position, token_id (R,), x (R, D))
        are not start rows."""
        keep = position >= self.positions
        if self.token_ids:
            keep &= ~torch.isin(token_id, torch.tensor(self.token_ids, device=token_id.device))
        if self.norm_ratio is not None and x.shape[0]:
            norms = x.norm(dim=1)
            keep &= norms <= self.norm_ratio * norms.median()
        return keep


def held_out(chunk_id: Tensor, fraction: float, block_chunks: int) -> Tensor:
    """Stable eval membership of each chunk: a share `fraction` of the corpus blocks
    (chunk_id // block_chunks), so no document has tokens in train and eval rows."""
    hashed = (block_ids(chunk_id, block_chunks) * _HASH_MULTIPLIER) % _HASH_RANGE
    return hashed.double() / _HASH_RANGE < fraction


class ActivationSource:
    """Base: shard reading (`_load`) is per kind; batching and sampling are shared."""

    kind: str

    def __init__(self, folder: Path, layer: int, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, kind=self.kind)
        self.layer = layer
        self.verify = verify
        cached = self.manifest.extra.get("layers", [])
        if layer not in cached:
            raise ValueError(
                f"{self.folder}: layer {layer} is not cached; it holds layers {cached}"
            )
        self.dim = int(self.manifest.shards[0].tensors[layer_key(layer)].shape[1])

    @property
    def model(self) -> str:
        return str(self.manifest.extra.get("model"))

    def _load(self, record: ShardRecord) -> tuple[Tensor, Tensor, Tensor]:
        """(items (R, 2), x (R, D) float32, is_eval (R,)) of one shard."""
        raise NotImplementedError

    def describe(self, items: Tensor, context_tokens: int = 16) -> list[str]:
        raise NotImplementedError

    def shards(self, split: Split = "all") -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(items, x, is_eval) per shard in storage order, rows of `split` only."""
        for record in self.manifest.shards:
            yield self._rows(record, split)

    def _rows(self, record: ShardRecord, split: Split) -> tuple[Tensor, Tensor, Tensor]:
        items, x, is_eval = self._load(record)
        if split == "all":
            return items, x, is_eval
        keep = is_eval if split == "eval" else ~is_eval
        return items[keep], x[keep], is_eval[keep]

    def batches(
        self, split: Split, batch_size: int, buffer_rows: int, shuffle: bool, seed: int = 0
    ) -> Iterator[RowBatch]:
        """Stream batches through the bounded shuffle buffer (`stream_batches`)."""
        shards = self.manifest.shards

        def load(index: int) -> dict[str, Tensor]:
            items, x, is_eval = self._rows(shards[index], split)
            return {"items": items, "x": x, "is_eval": is_eval}

        bounds = [record.rows for record in shards]
        for rows in stream_batches(load, bounds, batch_size, buffer_rows, shuffle, seed):
            yield RowBatch(rows["x"], rows["items"], rows["is_eval"])

    def sample(self, split: Split, max_rows: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """A seeded sample of at most `max_rows` rows of `split`: (items, x), bounded memory."""
        generator = torch.Generator().manual_seed(seed)
        share = min(1.0, max_rows / max(self.manifest.rows, 1))
        items_parts, x_parts = [], []
        for items, x, _ in self.shards(split):
            take = min(items.shape[0], max(1, round(share * items.shape[0])))
            pick = torch.randperm(items.shape[0], generator=generator)[:take]
            items_parts.append(items[pick])
            x_parts.append(x[pick])
        if not items_parts:
            return torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, self.dim)
        items, x = torch.cat(items_parts)[:max_rows], torch.cat(x_parts)[:max_rows]
        return items, x

    def gather(self, keys: Tensor) -> Tensor:
        """Rows (len(keys), D) of the items whose `item_keys` are `keys`, in that order."""
        out = torch.full((keys.numel(), self.dim), float("nan"))
        order = torch.argsort(keys)
        sorted_keys = keys[order]
        for items, x, _ in self.shards("all"):
            found = item_keys(items)
            hit = torch.isin(found, sorted_keys)
            where = torch.searchsorted(sorted_keys, found[hit])
            out[order[where]] = x[hit]
        missing = int(torch.isnan(out[:, 0]).sum()) if keys.numel() else 0
        if missing:
            raise ValueError(f"{self.folder}: {missing} of {keys.numel()} requested items absent")
        return out


class DirectionsSource(ActivationSource):
    kind = DIRECTIONS

    def __init__(self, folder: Path, layer: int, verify: bool = True):
        super().__init__(folder, layer, verify)
        mean_record = self.manifest.files["mean"]
        self.mean = read_shard(self.folder, mean_record, [layer_key(layer)], verify)[
            layer_key(layer)
        ].float()
        self._texts: dict[int, str] | None = None

    def _load(self, record: ShardRecord) -> tuple[Tensor, Tensor, Tensor]:
        key = layer_key(self.layer)
        shard = read_shard(self.folder, record, ["concept_id", "split", key], self.verify)
        ids = shard["concept_id"].long()
        items = torch.stack([ids, torch.full_like(ids, -1)], dim=1)
        return items, shard[key].float() - self.mean, shard["split"] != SPLIT_CODES["train"]

    def attach_texts(self, wordlist: Path) -> None:
        """Concept texts for `describe`, from the wordlist stage's parquet table."""
        from pipeline.inputs.words import read_concepts

        table = read_concepts(Path(wordlist))
        ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
        self._texts = dict(zip(ids, texts, strict=True))

    def describe(self, items: Tensor, context_tokens: int = 16) -> list[str]:
        if self._texts is None:
            raise ValueError("DirectionsSource.describe needs attach_texts(wordlist) first")
        return [
            self._texts.get(int(i), f"<concept {int(i)} not in the wordlist>") for i in items[:, 0]
        ]


class TokenSource(ActivationSource):
    kind = ACTIVATIONS

    def __init__(
        self,
        folder: Path,
        layer: int,
        eval_fraction: float = 0.1,
        verify: bool = True,
        start: StartRows = StartRows(),
    ):
        super().__init__(folder, layer, verify)
        self.eval_fraction = eval_fraction
        self.start = start
        """The start rows left out of every split."""
        self._dropped: dict[str, tuple[int, int]] = {}  # shard file -> (train, eval) rows
        if "block_chunks" not in self.manifest.extra:
            raise ValueError(
                f"{self.folder}/manifest.json has no block_chunks: it was written before "
                "held-out chunks followed documents; re-run the corpus and activations stages"
            )
        self.block_chunks = int(self.manifest.extra["block_chunks"])
        self._corpus: CorpusChunks | None = None
        self._tokenizer = None

    def _load(self, record: ShardRecord) -> tuple[Tensor, Tensor, Tensor]:
        key = layer_key(self.layer)
        names = ["chunk_id", "position", "token_id", key]
        shard = read_shard(self.folder, record, names, self.verify)
        items = torch.stack([shard["chunk_id"].long(), shard["position"].long()], dim=1)
        is_eval = held_out(shard["chunk_id"], self.eval_fraction, self.block_chunks)
        x = shard[key].float()
        keep = self.start.kept(items[:, 1], shard["token_id"].long(), x)
        dropped_eval = int((is_eval & ~keep).sum())
        self._dropped[record.file] = (int((~keep).sum()) - dropped_eval, dropped_eval)
        return items[keep], x[keep], is_eval[keep]

    @property
    def dropped_rows(self) -> dict[str, int]:
        """Start rows left out so far, by split (every shard counted once, however often read)."""
        counts = self._dropped.values()
        return {"train": sum(c[0] for c in counts), "eval": sum(c[1] for c in counts)}

    def attach_texts(self, corpus: Path, tokenizer) -> None:
        """The corpus chunks and the tokenizer that decodes them, for `describe`."""
        self._corpus = CorpusChunks(corpus, verify=self.verify)
        self._tokenizer = tokenizer

    def describe(self, items: Tensor, context_tokens: int = 16) -> list[str]:
        if self._corpus is None or self._tokenizer is None:
            raise ValueError("TokenSource.describe needs attach_texts(corpus, tokenizer) first")
        chunks = self._corpus.tokens_of(items[:, 0].unique())
        after = max(1, context_tokens // 4)
        spans = []
        for chunk_id, position in items.tolist():
            tokens = chunks[chunk_id].tolist()
            before = tokens[max(0, position - context_tokens) : position]
            tail = tokens[position + 1 : position + 1 + after]
            decode = self._tokenizer.decode
            spans.append(
                f"{decode(before)}[[{decode(tokens[position : position + 1])}]]{decode(tail)}"
            )
        return spans


def open_source(
    folder: Path,
    layer: int,
    eval_fraction: float = 0.1,
    verify: bool = True,
    keep_start_rows: bool = False,
) -> ActivationSource:
    """The reader for whichever kind of dump `folder` holds (its manifest says); token
    rows leave out each chunk's start rows unless `keep_start_rows` (`StartRows`)."""
    manifest = Manifest.load(Path(folder))
    if manifest.kind == DIRECTIONS:
        return DirectionsSource(folder, layer, verify)
    if manifest.kind == ACTIVATIONS:
        start = StartRows.of(manifest.extra, keep_start_rows)
        return TokenSource(folder, layer, eval_fraction, verify, start)
    raise ValueError(
        f"{folder} holds a {manifest.kind!r} dump; the SAE reads {DIRECTIONS!r} or {ACTIVATIONS!r}"
    )

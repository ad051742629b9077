"""The `directions` artifact: its layout, and a streaming reader for training.

Layout of a directions folder (all tensors safetensors, listed in manifest.json):

    shard-00000.safetensors   concept_id int64 (R,), split int8 (R,), layer_<L> (R, D)
    mean.safetensors          layer_<L> float32 (D,)      train-split mean activation
    embeddings.safetensors    token_ids int64 (V,) sorted, rows float32 (V, E)
                              the teacher's input-embedding rows for the tokens concepts use
    tokens.safetensors        offsets int64 (N+1,), token_ids int64 (T,)
                              concept i's token ids are token_ids[offsets[i]:offsets[i+1]],
                              as the teacher saw them inside a template (leading space
                              included: `concept_vectors.concept_token_table`); what
                              every token-reading student and the inverse read
    text.safetensors          offsets int64 (N+1,), bytes uint8 (C,)
                              concept i's text, UTF-8: bytes[offsets[i]:offsets[i+1]]
                              (what the character-level student reads: no tokenizer)

direction = activation - train mean. Training streams shards through the bounded
shuffle buffer of `pipeline/common/stream.py`, so a dump larger than memory still trains.
`DirectionSet` reads one layer; `LayerStack` several at once (targets (R, L, D)).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.common.shards import Manifest, layer_key, read_shard
from pipeline.common.splits import SPLITS
from pipeline.common.stream import stream_batches

KIND = "directions"
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class Batch:
    """Rows of one split; a student reads its inputs (token ids or bytes) through
    `pipeline.concepts.students.forward_concepts`."""

    concept_id: torch.Tensor  # (B,) int64
    target: torch.Tensor  # (B, D) float32 direction


def padded_rows(offsets: torch.Tensor, flat: torch.Tensor, ids: torch.Tensor):
    """Rows `ids` of a CSR table, right-padded with 0 -> values (B, W) int64, mask (B, W)."""
    starts, ends = offsets[ids], offsets[ids + 1]
    lengths = ends - starts
    width = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(width)
    mask = positions[None, :] < lengths[:, None]
    index = (starts[:, None] + positions[None, :]).clamp(max=max(flat.numel() - 1, 0))
    values = torch.where(mask, flat[index].long(), torch.zeros_like(index))
    return values, mask


class DirectionSet:
    """Reads one layer of a directions folder; checks every file against the manifest."""

    def __init__(self, folder: Path, layer: int, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, kind=KIND)
        self.layer = layer
        self.verify = verify
        cached = self.manifest.extra["layers"]
        if layer not in cached:
            raise ValueError(
                f"{self.folder}: layer {layer} is not cached; it holds layers {cached}"
            )
        files = self.manifest.files
        self.mean = read_shard(self.folder, files["mean"], [layer_key(layer)], verify)[
            layer_key(layer)
        ]
        emb = read_shard(self.folder, files["embeddings"], verify=verify)
        self.embedding_token_ids, self.embedding_rows = emb["token_ids"], emb["rows"]
        tok = read_shard(self.folder, files["tokens"], verify=verify)
        self.offsets, self.flat_tokens = tok["offsets"], tok["token_ids"]
        if "text" not in files:
            raise ValueError(
                f"{self.folder}: the manifest lists no text file (concept texts as UTF-8 "
                "bytes); it was written before the character-level student: re-run the "
                "directions stage"
            )
        text = read_shard(self.folder, files["text"], verify=verify)
        self.text_offsets, self.flat_bytes = text["offsets"], text["bytes"]
        if self.text_offsets.numel() != self.offsets.numel():
            raise ValueError(
                f"{self.folder}: text file holds {self.text_offsets.numel() - 1} concepts, "
                f"the token file {self.offsets.numel() - 1}"
            )

    @property
    def num_concepts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def dim(self) -> int:
        return self.mean.numel()

    @property
    def vocab_size(self) -> int:
        return int(self.manifest.extra["vocab_size"])

    def concept_tokens(self, concept_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids (B, T) and mask (B, T) for the given concepts."""
        return padded_rows(self.offsets, self.flat_tokens, concept_ids)

    def concept_bytes(self, concept_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded UTF-8 bytes (B, C) int64 in 0..255 and mask (B, C) of the concepts'
        texts; padded positions hold 0 and mask False."""
        return padded_rows(self.text_offsets, self.flat_bytes, concept_ids)

    def concept_texts(self, concept_ids: torch.Tensor) -> list[str]:
        """The concepts' texts, decoded from the stored UTF-8 bytes."""
        starts, ends = self.text_offsets[concept_ids], self.text_offsets[concept_ids + 1]
        raw = self.flat_bytes.numpy().tobytes()
        return [raw[s:e].decode() for s, e in zip(starts.tolist(), ends.tolist(), strict=True)]

    def split_shards(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(concept_id (R,), direction (R, D) float32) per shard, rows of `split` only."""
        for record in self.manifest.shards:
            yield self._split_rows(record, split)

    def load_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split in memory, for evaluation of moderate sizes."""
        parts = list(self.split_shards(split))
        if not parts:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, self.dim)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def batches(
        self, split: str, batch_size: int, buffer_rows: int, shuffle: bool, seed: int = 0
    ) -> Iterator[Batch]:
        """Stream batches of `split` through the bounded shuffle buffer (`stream_batches`)."""
        shards = self.manifest.shards

        def load(index: int) -> dict[str, torch.Tensor]:
            concept_id, target = self._split_rows(shards[index], split)
            return {"concept_id": concept_id, "target": target}

        bounds = [record.rows for record in shards]
        for rows in stream_batches(load, bounds, batch_size, buffer_rows, shuffle, seed):
            yield Batch(rows["concept_id"], rows["target"])

    def _split_rows(self, record, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        names = ["concept_id", "split", layer_key(self.layer)]
        shard = read_shard(self.folder, record, names, self.verify)
        keep = shard["split"] == SPLIT_CODES[split]
        return shard["concept_id"][keep], shard[layer_key(self.layer)][keep].float() - self.mean


class LayerStack(DirectionSet):
    """Several cached layers of a directions folder at once: each target row is (L, D),
    the layers in `layers` order, each centred on its own train mean. Everything else
    (tokens, embedding table, `batches`, `load_split`) is DirectionSet's, whose `layer`
    here is `layers[0]`: batches stream targets (B, L, D), `load_split` gives (N, L, D).
    """

    def __init__(self, folder: Path, layers: Sequence[int], verify: bool = True):
        super().__init__(folder, layers[0], verify)
        self.layers = tuple(layers)
        cached = self.manifest.extra["layers"]
        missing = [layer for layer in self.layers if layer not in cached]
        if missing:
            raise ValueError(
                f"{self.folder}: layers {missing} are not cached; it holds layers {cached}"
            )
        names = [layer_key(layer) for layer in self.layers]
        means = read_shard(self.folder, self.manifest.files["mean"], names, verify)
        self.means = torch.stack([means[name] for name in names])  # (L, D)

    def _split_rows(self, record, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        names = [layer_key(layer) for layer in self.layers]
        shard = read_shard(self.folder, record, ["concept_id", "split", *names], self.verify)
        keep = shard["split"] == SPLIT_CODES[split]
        stacked = torch.stack([shard[name][keep].float() for name in names], 1)  # (R, L, D)
        return shard["concept_id"][keep], stacked - self.means


def write_shard_rows(
    path: Path, concept_id: torch.Tensor, split: torch.Tensor, activations: dict[int, torch.Tensor]
):
    """One directions shard: ids, split codes and each layer's activations (R, D)."""
    from pipeline.common.shards import write_shard

    tensors = {"concept_id": concept_id.long(), "split": split.to(torch.int8)}
    tensors.update({layer_key(layer): act for layer, act in activations.items()})
    return write_shard(path, tensors)


def write_side_files(
    folder: Path,
    means: dict[int, torch.Tensor],
    embedding_token_ids: torch.Tensor,
    embedding_rows: torch.Tensor,
    offsets: torch.Tensor,
    flat_tokens: torch.Tensor,
    texts: list[str],
):
    """The mean, embedding-table, token and text files; returns their manifest records.
    `texts[i]` is concept i's text (the same order as `offsets`)."""
    from pipeline.common.shards import write_shard

    folder = Path(folder)
    return {
        "mean": write_shard(
            folder / "mean.safetensors", {layer_key(k): v.float() for k, v in means.items()}
        ),
        "embeddings": write_shard(
            folder / "embeddings.safetensors",
            {"token_ids": embedding_token_ids.long(), "rows": embedding_rows.float()},
        ),
        "tokens": write_shard(
            folder / "tokens.safetensors",
            {"offsets": offsets.long(), "token_ids": flat_tokens.long()},
            rowwise=False,
        ),
        "text": write_shard(folder / "text.safetensors", text_table(texts), rowwise=False),
    }


def text_table(texts: list[str]) -> dict[str, torch.Tensor]:
    """CSR of the texts' UTF-8 bytes: offsets int64 (N+1,), bytes uint8 (C,)."""
    encoded = [text.encode() for text in texts]
    lengths = torch.tensor([len(b) for b in encoded], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.tensor(list(b"".join(encoded)), dtype=torch.uint8)
    return {"offsets": offsets, "bytes": flat}

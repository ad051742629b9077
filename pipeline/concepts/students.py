"""The students: a concept's token ids or UTF-8 bytes -> a direction vector in the
teacher's residual space.

    trainable     own Embedding(U, e) of the U tokens concepts use -> mean -> Linear(e, h)
                  -> GELU -> Linear(h, D)
    frozen_mlp    teacher rows (E)    -> mean -> Linear(E, h) -> GELU -> Linear(h, D)
    linear_probe  teacher rows (E)    -> mean -> Linear(E, D)
    distilled     tiny table (e) -> projection (e, E) -> mean -> MLP(E, h, D); table and
                  projection are the rank-e truncated SVD of the teacher rows, frozen
    char_cnn      UTF-8 bytes -> Embedding(256, e) -> 2 x Conv1d(k, c) + GELU
                  -> [max; mean] over bytes -> MLP(2c, h, D); no tokenizer, no teacher table

Each student declares what it reads (`reads`: "tokens" or "bytes");
`forward_concepts(model, data, concept_ids)` is the one forward every caller uses
(training, evaluation). The frozen teacher rows are a non-persistent buffer: not
trained, not saved (they live in the directions folder), so `load_student` rebuilds a
model from `config.json` plus the directions folder. The distilled table and
projection are fitted (not trained by gradient) and saved with the head: a deployment
carries them instead of the teacher's table.

Every token table holds only the rows of the tokens the directions set's concepts use
(all splits: its sorted `embedding_token_ids`), looked up by binary search
(`pipeline.common.token_table`): the frozen rows and the distilled table by
construction, and the trainable embedding, whose remap (`token_ids`) is saved with its
weights, so that its size and its AdamW step scale with the tokens used, not the
vocabulary. The character student's byte table has all 256 rows.

    model = build_model(RunParams("frozen_mlp", hidden_dim=256), V, D, ids, rows)
    pred = forward_concepts(model, directions, concept_ids)  # (B, D)
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.common.checkpoints import CONFIG, WEIGHTS, load_weights, read_config
from pipeline.common.token_table import check_sorted_ids, table_index
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams

FROZEN_APPROACHES = ("frozen_mlp", "linear_probe")
APPROACHES = tuple(RunParams.NEEDS)
BYTE_VALUES = 256
TOKENS, BYTES = "tokens", "bytes"
"""What a student reads (its `reads`): teacher token ids, or the text's UTF-8 bytes."""


def forward_concepts(model: nn.Module, data: DirectionSet, concept_ids: Tensor) -> Tensor:
    """The student's predictions (B, D) for the concepts, from the inputs it reads (with
    grad; scoring callers wrap it in torch.no_grad / inference_mode)."""
    reads = getattr(model, "reads", None)
    if reads == BYTES:
        values, mask = data.concept_bytes(concept_ids)
    elif reads == TOKENS:
        values, mask = data.concept_tokens(concept_ids)
    else:
        raise ValueError(f"{type(model).__name__} reads {reads!r}; known: {[TOKENS, BYTES]}")
    device = next(model.parameters()).device
    return model(values.to(device), mask.to(device))


PREDICT_BATCH = 1024
"""Concepts per forward pass of `predict`; memory only, results do not depend on it."""


@torch.inference_mode()
def predict(model: nn.Module, data: DirectionSet, concept_ids: Tensor) -> Tensor:
    """Student predictions (N, D) float32 for the given concepts, in batches."""
    out = [torch.zeros(0, data.dim)]
    for start in range(0, concept_ids.numel(), PREDICT_BATCH):
        batch = concept_ids[start : start + PREDICT_BATCH]
        out.append(forward_concepts(model, data, batch).float())
    return torch.cat(out)


def mean_pool(embedded: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, T, E) over real tokens -> (B, E); padded positions contribute nothing."""
    weights = mask.to(embedded.dtype).unsqueeze(-1)  # (B, T, 1)
    # clamp: an all-padding row pools to zeros instead of NaN.
    return (embedded * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


def check_table_ids(token_ids: Tensor, rows: Tensor) -> None:
    if token_ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != token_ids.numel():
        raise ValueError(
            f"embedding table needs token_ids (V,) and rows (V, E), got "
            f"{tuple(token_ids.shape)} and {tuple(rows.shape)}"
        )
    check_sorted_ids(token_ids)


def student_index(token_ids: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
    """`table_index` into a student's table, whose error names the directions folder."""
    table = (
        f"the student's embedding table ({token_ids.numel()} rows, the tokens the directions' "
        "concepts use): was the directions folder built for this vocabulary and these concepts?"
    )
    return table_index(token_ids, tokens, mask, table)


INIT_CHUNK_ROWS = 4096
"""Rows of the whole table that `held_normal_rows` draws at a time; a multiple of 16."""


def held_normal_rows(vocab_size: int, dim: int, token_ids: Tensor) -> Tensor:
    """Rows `token_ids` (sorted, unique) (U, dim) of the N(0, 1) table that
    nn.Embedding(vocab_size, dim) would draw from the global generator, which is left
    where that draw leaves it, so what is built next gets the same init too. The table
    is drawn INIT_CHUNK_ROWS rows at a time, never held whole.

    Why chunks give the same values: torch's CPU normal_ draws one uniform per value and
    transforms them 16 at a time (Box-Muller), redrawing the last 16 when the size is no
    multiple of 16. Chunks of a multiple of 16 values, the last at least 16 long (the
    remainder joins it), therefore draw exactly the whole table's values; the test
    against nn.Embedding (tests/concepts/test_held_rows.py) guards this for the torch
    installed.
    """
    if token_ids.numel() and not 0 <= int(token_ids[0]) <= int(token_ids[-1]) < vocab_size:
        raise ValueError(
            f"trainable embedding: token ids {int(token_ids[0])}..{int(token_ids[-1])} "
            f"fall outside the vocabulary of {vocab_size} tokens"
        )
    held = torch.empty(token_ids.numel(), dim)
    start = 0
    while start < vocab_size:
        remaining = vocab_size - start
        stop = vocab_size if remaining < 2 * INIT_CHUNK_ROWS else start + INIT_CHUNK_ROWS
        chunk = torch.empty(stop - start, dim).normal_()  # what nn.Embedding's init calls
        low, high = torch.searchsorted(token_ids, torch.tensor([start, stop])).tolist()
        held[low:high] = chunk.index_select(0, token_ids[low:high] - start)
        start = stop
    return held


class TrainableEmbeddingMLP(nn.Module):
    """A tiny embedding trained from scratch that holds the rows of the sorted `token_ids`
    only (the tokens the concepts use; a persistent buffer, saved with the weights), each
    initialised as nn.Embedding(vocab_size, e) initialises it for the same seed. So it
    trains exactly as a table of the whole vocabulary would (whose other rows no concept
    reads), at the cost of the rows held."""

    reads = TOKENS

    def __init__(
        self, vocab_size: int, token_ids: Tensor, embed_dim: int, hidden_dim: int, output_dim: int
    ):
        super().__init__()
        check_sorted_ids(token_ids)
        self.register_buffer("token_ids", token_ids.long().clone())  # (U,)
        rows = held_normal_rows(vocab_size, embed_dim, self.token_ids)
        self.embedding = nn.Embedding.from_pretrained(rows, freeze=False)  # (U, e)
        self.head = mlp(embed_dim, hidden_dim, output_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        rows = self.embedding(student_index(self.token_ids, tokens, mask))  # (B, T, e)
        return self.head(mean_pool(rows, mask))  # (B, D)


class FrozenEmbeddingModel(nn.Module):
    """The teacher's input-embedding rows, frozen, followed by a trainable `head`.

    The table holds only the rows concepts use (sorted `token_ids` -> `rows`), so a
    token id is looked up with a binary search rather than indexed directly.
    """

    reads = TOKENS

    def __init__(self, token_ids: Tensor, rows: Tensor, head: nn.Module):
        super().__init__()
        check_table_ids(token_ids, rows)
        # persistent=False: neither trained nor written to model.safetensors.
        self.register_buffer("token_ids", token_ids.long().clone(), persistent=False)  # (V,)
        self.register_buffer("rows", rows.float().clone(), persistent=False)  # (V, E)
        self.head = head

    def lookup(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Teacher rows (B, T, E) for token ids (B, T); padded positions may hold any id."""
        return self.rows[student_index(self.token_ids, tokens, mask)]

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(mean_pool(self.lookup(tokens, mask), mask))  # (B, D)


def distill_table(rows: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Stage one of `distilled`: the tiny table (V, e) and projection (e, E) whose product
    is nearest the teacher rows (V, E) in least squares, i.e. the rank-e truncated SVD
    (Eckart-Young): table = U_e S_e, projection = V_e^T. Exact and deterministic (no
    training); computed in float64."""
    if rank > min(rows.shape):
        raise ValueError(
            f"distilled embed_dim={rank} exceeds the rank the teacher table can have: "
            f"{tuple(rows.shape)} rows (used tokens x width)"
        )
    u, s, vh = torch.linalg.svd(rows.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).float(), vh[:rank].float()


class DistilledEmbeddingModel(nn.Module):
    """A rank-e factorisation of the teacher rows (frozen, saved), then a trainable `head`:
    tiny table -> projection -> mean over tokens -> head."""

    reads = TOKENS

    def __init__(self, token_ids: Tensor, table: Tensor, projection: Tensor, head: nn.Module):
        super().__init__()
        check_table_ids(token_ids, table)
        self.register_buffer("token_ids", token_ids.long().clone(), persistent=False)  # (V,)
        self.register_buffer("table", table.float().clone())  # (V, e)
        self.register_buffer("projection", projection.float().clone())  # (e, E)
        self.head = head

    def reconstructed_rows(self) -> Tensor:
        return self.table @ self.projection  # (V, E)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        small = self.table[student_index(self.token_ids, tokens, mask)]  # (B, T, e)
        # The projection is linear, so it commutes with the mean: project once per concept.
        return self.head(mean_pool(small, mask) @ self.projection)  # (B, D)


class CharCNN(nn.Module):
    """UTF-8 bytes -> direction: byte embedding, two same-length convolutions, max and mean
    over the real bytes, MLP. Padded bytes are zeroed after every layer, so a concept's
    output does not depend on how wide its batch is."""

    reads = BYTES

    def __init__(
        self, embed_dim: int, channels: int, kernel_size: int, hidden_dim: int, output_dim: int
    ):
        super().__init__()
        self.embedding = nn.Embedding(BYTE_VALUES, embed_dim)
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(embed_dim, channels, kernel_size, padding="same"),
                nn.Conv1d(channels, channels, kernel_size, padding="same"),
            ]
        )
        self.head = mlp(2 * channels, hidden_dim, output_dim)

    def forward(self, data: Tensor, mask: Tensor) -> Tensor:
        keep = mask.unsqueeze(1).to(self.embedding.weight.dtype)  # (B, 1, C)
        x = self.embedding(data).transpose(1, 2) * keep  # (B, e, C)
        for conv in self.convs:
            x = nn.functional.gelu(conv(x)) * keep  # (B, c, C)
        peak = x.masked_fill(~mask.unsqueeze(1), -torch.inf).amax(-1)  # (B, c)
        peak = torch.where(mask.any(1, keepdim=True), peak, torch.zeros_like(peak))
        mean = x.sum(-1) / keep.sum(-1).clamp_min(1.0)  # (B, c)
        return self.head(torch.cat([peak, mean], 1))  # (B, D)


def build_model(
    run: RunParams,
    vocab_size: int,
    output_dim: int,
    embedding_token_ids: Tensor,
    embedding_rows: Tensor,
) -> nn.Module:
    """The student of one comparison row. `embedding_token_ids` (the tokens concepts use)
    are the rows every token student holds; the teacher's `embedding_rows` are ignored by
    `trainable`, factorised by `distilled`; `char_cnn` reads neither."""
    if run.approach == "trainable":
        return TrainableEmbeddingMLP(
            vocab_size, embedding_token_ids, run.embed_dim, run.hidden_dim, output_dim
        )
    if run.approach == "char_cnn":
        return CharCNN(run.embed_dim, run.channels, run.kernel_size, run.hidden_dim, output_dim)
    embedding_dim = embedding_rows.shape[1]
    if run.approach == "distilled":
        table, projection = distill_table(embedding_rows, run.embed_dim)
        head = mlp(embedding_dim, run.hidden_dim, output_dim)
        return DistilledEmbeddingModel(embedding_token_ids, table, projection, head)
    if run.approach == "frozen_mlp":
        head = mlp(embedding_dim, run.hidden_dim, output_dim)
    elif run.approach == "linear_probe":
        head = nn.Linear(embedding_dim, output_dim)
    else:
        raise ValueError(f"unknown approach {run.approach!r}; known: {list(APPROACHES)}")
    return FrozenEmbeddingModel(embedding_token_ids, embedding_rows, head)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


REMAP_BYTES = 8
"""Bytes per held token id of a trainable student's remap (int64, as saved)."""


def inference_bytes(
    approach: str,
    trainable_params: int,
    vocab_size: int,
    embedding_dim: int,
    embed_dim: int | None = None,
    held_tokens: int | None = None,
    bytes_per_value: int = 4,
) -> int:
    """Memory to run the student: `trainable_params` (the head; all the weights of a
    standalone student) plus the tables it reads. Frozen approaches carry the teacher's
    FULL table, `distilled` a tiny table of the FULL vocabulary (vocab_size x e) and its
    projection (e x E), on purpose: a deployment needs a row for any token an unseen
    concept may use (seed 000's "600MB*": Qwen3-0.6B's 151,936 x 1024 float32 table).
    `trainable` carries its held rows (in `trainable_params`) and their remap,
    `held_tokens` int64 ids: a token no concept of its directions set uses would only
    have an untrained random row.
    """
    if approach in FROZEN_APPROACHES:
        table = vocab_size * embedding_dim * bytes_per_value
    elif approach == "distilled":
        if embed_dim is None:
            raise ValueError("inference_bytes of a distilled student needs its embed_dim")
        table = (vocab_size * embed_dim + embed_dim * embedding_dim) * bytes_per_value
    elif approach == "trainable":
        if held_tokens is None:
            raise ValueError("inference_bytes of a trainable student needs its held_tokens")
        table = held_tokens * REMAP_BYTES
    else:
        table = 0
    return trainable_params * bytes_per_value + table


SEEDS_DIR = "seeds"


def load_student(folder: Path, directions: DirectionSet) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved by the distill stage from its `config.json` and the
    directions' table (its weights hold the trainable parameters only, and a trainable
    student's remap, checked against the directions' tokens); eval mode."""
    folder = Path(folder)
    config = read_config(folder, _REQUIRED)
    if config["approach"] not in APPROACHES:
        raise ValueError(
            f"{folder / CONFIG}: approach {config['approach']!r} not in {list(APPROACHES)}"
        )
    if config["approach"] == "trainable" and config.get("held_tokens") is None:
        raise ValueError(
            f"{folder / CONFIG}: a trainable student written before it held only the rows "
            "of the tokens its concepts use (no held_tokens): re-train it (dvc repro its "
            "distill stage)"
        )
    _check_matches(config, directions, folder / CONFIG)
    try:
        # A key the config lacks keeps its default (a config older than the key).
        run = RunParams(**{f.name: config[f.name] for f in fields(RunParams) if f.name in config})
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG}: {err}") from err
    model = build_model(
        run,
        config["vocab_size"],
        config["output_dim"],
        directions.embedding_token_ids,
        directions.embedding_rows,
    )
    model = load_weights(model, folder)
    if isinstance(model, TrainableEmbeddingMLP) and not torch.equal(
        model.token_ids, directions.embedding_token_ids
    ):
        raise ValueError(
            f"{folder / WEIGHTS}: its token remap (token_ids) is not the tokens the concepts "
            f"of {directions.folder} use: it was trained on another directions set"
        )
    return model, config


def seed_folder(run_folder: Path, seed: int) -> Path:
    """Where the distill stage puts seed `seed`'s checkpoint and curves inside a run folder."""
    return Path(run_folder) / SEEDS_DIR / str(seed)


_REQUIRED = ("approach", "vocab_size", "output_dim", "embedding_dim", "layer")


def _check_matches(config: dict[str, Any], directions: DirectionSet, path: Path) -> None:
    """A checkpoint only makes sense with the layer it was trained on, and (a student of
    token ids) the vocabulary and table, and (trainable) the tokens it holds rows for; a
    character student reads no table."""
    found = {"layer": directions.layer, "output_dim": directions.dim}
    if config["approach"] != "char_cnn":
        found |= {
            "vocab_size": directions.vocab_size,
            "embedding_dim": directions.embedding_rows.shape[1],
        }
    if config["approach"] == "trainable":
        found["held_tokens"] = directions.embedding_token_ids.numel()
    for key, value in found.items():
        if config[key] != value:
            raise ValueError(
                f"{path}: {key}={config[key]}, but the directions folder "
                f"{directions.folder} has {key}={value}"
            )

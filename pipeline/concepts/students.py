"""The seed-000 students: token ids -> a direction vector in the teacher's residual space.

Every model mean-pools over a concept's real tokens, then maps the pooled vector
to the teacher's width D:

    trainable     own Embedding(V, e) -> mean -> Linear(e, h) -> GELU -> Linear(h, D)
    frozen_mlp    teacher rows (E)    -> mean -> Linear(E, h) -> GELU -> Linear(h, D)
    linear_probe  teacher rows (E)    -> mean -> Linear(E, D)

The frozen teacher rows are a non-persistent buffer: they are not trained and not
saved in a checkpoint (they live in the directions folder), so `load_student`
rebuilds a model from `config.json` plus the directions' embedding table.

    model = build_model(RunParams("frozen_mlp", hidden_dim=256), V, D, ids, rows)
    pred = model(tokens, mask)  # (B, D)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.common.checkpoints import CONFIG, load_weights, read_config
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import RunParams

FROZEN_APPROACHES = ("frozen_mlp", "linear_probe")
APPROACHES = ("trainable", *FROZEN_APPROACHES)


def mean_pool(embedded: Tensor, mask: Tensor) -> Tensor:
    """Mean of (B, T, E) over real tokens -> (B, E); padded positions contribute nothing."""
    weights = mask.to(embedded.dtype).unsqueeze(-1)  # (B, T, 1)
    # clamp: an all-padding row pools to zeros instead of NaN.
    return (embedded * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class TrainableEmbeddingMLP(nn.Module):
    """A tiny embedding of the teacher's whole vocabulary, trained from scratch."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.head = mlp(embed_dim, hidden_dim, output_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(mean_pool(self.embedding(tokens), mask))  # (B, D)


class FrozenEmbeddingModel(nn.Module):
    """The teacher's input-embedding rows, frozen, followed by a trainable `head`.

    The table holds only the rows concepts use (sorted `token_ids` -> `rows`), so a
    token id is looked up with a binary search rather than indexed directly.
    """

    def __init__(self, token_ids: Tensor, rows: Tensor, head: nn.Module):
        super().__init__()
        if token_ids.dim() != 1 or rows.dim() != 2 or rows.shape[0] != token_ids.numel():
            raise ValueError(
                f"embedding table needs token_ids (V,) and rows (V, E), got "
                f"{tuple(token_ids.shape)} and {tuple(rows.shape)}"
            )
        if token_ids.numel() > 1 and not bool((token_ids[1:] > token_ids[:-1]).all()):
            raise ValueError("embedding token_ids must be sorted and unique for searchsorted")
        # persistent=False: neither trained nor written to model.safetensors.
        self.register_buffer("token_ids", token_ids.long().clone(), persistent=False)  # (V,)
        self.register_buffer("rows", rows.float().clone(), persistent=False)  # (V, E)
        self.head = head

    def lookup(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Teacher rows (B, T, E) for token ids (B, T); padded positions may hold any id."""
        index = torch.searchsorted(self.token_ids, tokens).clamp(max=self.token_ids.numel() - 1)
        missing = mask & (self.token_ids[index] != tokens)  # (B, T)
        if bool(missing.any()):
            absent = torch.unique(tokens[missing])[:10].tolist()
            raise ValueError(
                f"token ids {absent} are not in the frozen embedding table "
                f"({self.token_ids.numel()} rows): was the directions folder built for this "
                "vocabulary?"
            )
        return self.rows[index]

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(mean_pool(self.lookup(tokens, mask), mask))  # (B, D)


def build_model(
    run: RunParams,
    vocab_size: int,
    output_dim: int,
    embedding_token_ids: Tensor,
    embedding_rows: Tensor,
) -> nn.Module:
    """The student of one comparison row; the table is ignored by `trainable`."""
    if run.approach == "trainable":
        return TrainableEmbeddingMLP(vocab_size, run.embed_dim, run.hidden_dim, output_dim)
    embedding_dim = embedding_rows.shape[1]
    if run.approach == "frozen_mlp":
        head = mlp(embedding_dim, run.hidden_dim, output_dim)
    elif run.approach == "linear_probe":
        head = nn.Linear(embedding_dim, output_dim)
    else:
        raise ValueError(f"unknown approach {run.approach!r}; known: {list(APPROACHES)}")
    return FrozenEmbeddingModel(embedding_token_ids, embedding_rows, head)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inference_bytes(
    approach: str,
    trainable_params: int,
    vocab_size: int,
    embedding_dim: int,
    bytes_per_value: int = 4,
) -> int:
    """Memory to run the student; frozen approaches also carry the teacher's FULL table.

    Seed 000's "600MB*": Qwen3-0.6B's 151,936 x 1024 float32 table, which a deployment
    needs because an unseen concept may use any token.
    """
    frozen = vocab_size * embedding_dim if approach in FROZEN_APPROACHES else 0
    return (trainable_params + frozen) * bytes_per_value


SEEDS_DIR = "seeds"


def load_student(folder: Path, directions: DirectionSet) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a student saved by the distill stage from its `config.json` and the
    directions' table (its weights hold the trainable parameters only); eval mode."""
    folder = Path(folder)
    config = read_config(folder, _REQUIRED)
    if config["approach"] not in APPROACHES:
        raise ValueError(
            f"{folder / CONFIG}: approach {config['approach']!r} not in {list(APPROACHES)}"
        )
    _check_matches(config, directions, folder / CONFIG)
    try:
        run = RunParams(config["approach"], config.get("embed_dim"), config.get("hidden_dim"))
    except ValueError as err:
        raise ValueError(f"{folder / CONFIG}: {err}") from err
    model = build_model(
        run,
        config["vocab_size"],
        config["output_dim"],
        directions.embedding_token_ids,
        directions.embedding_rows,
    )
    return load_weights(model, folder), config


def seed_folder(run_folder: Path, seed: int) -> Path:
    """Where the distill stage puts seed `seed`'s checkpoint and curves inside a run folder."""
    return Path(run_folder) / SEEDS_DIR / str(seed)


_REQUIRED = ("approach", "vocab_size", "output_dim", "embedding_dim", "layer")


def _check_matches(config: dict[str, Any], directions: DirectionSet, path: Path) -> None:
    """A checkpoint only makes sense with the table and layer it was trained on."""
    found = {
        "layer": directions.layer,
        "output_dim": directions.dim,
        "vocab_size": directions.vocab_size,
        "embedding_dim": directions.embedding_rows.shape[1],
    }
    for key, value in found.items():
        if config[key] != value:
            raise ValueError(
                f"{path}: {key}={config[key]}, but the directions folder "
                f"{directions.folder} has {key}={value}"
            )


def forward_concepts(model: nn.Module, data: DirectionSet, concept_ids: Tensor) -> Tensor:
    """The student's predictions (B, D) for concepts `concept_ids` (B,), with grad: the one
    forward every caller that starts from concept ids goes through (callers that score wrap
    it in torch.no_grad / inference_mode)."""
    device = next(model.parameters()).device
    tokens, mask = data.concept_tokens(concept_ids)
    return model(tokens.to(device), mask.to(device))

"""Steering a frozen causal LM with one learned vector (seed 004): hooks, scoring, training.

A `SteeringVector` holds v (d_model) and one scale per layer; at decoder layer
`layers[i]` the residual stream (that layer's output) receives `scales[i] * v`,
at every position or from a token index on. `steer` installs the forward hooks
for the duration of a `with` block and always removes them, so the model is
bit-identical afterwards. A question is answered by the ending with the highest
length-normalised log-likelihood; training minimises the cross-entropy over
those 4 scores and touches nothing but v and the scales.

    vector = SteeringVector(layers=(2, 14, 22), dim=model.config.hidden_size)
    fit = train_vector(model, vector, encode(train, tok), encode(val, tok), params)
    with steer(model, vector.deltas(coefficient=1.3)):
        scores = ending_scores(model, batch)  # (B, 4)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.common.checkpoints import WEIGHTS, read_config, read_weights, save_checkpoint
from pipeline.common.progress import progress
from pipeline.common.sequence_start import describe_start
from pipeline.common.teacher import decoder_blocks
from pipeline.steering_vectors.params import SteeringParams
from pipeline.steering_vectors.questions import NUM_ENDINGS, McQuestion

log = logging.getLogger(__name__)

SEED_SCALES = (0.5, 1.0, 0.3)
"""Seed 004's initial scales of a three-layer vector (early, mid, late)."""

Deltas = Mapping[int, Tensor]
"""Decoder-layer index -> the vector (D,) its output receives."""


@contextlib.contextmanager
def steer(model: nn.Module, deltas: Deltas, position: int = 0) -> Iterator[None]:
    """Add `deltas[i]` to the output of decoder layer i, at token positions >= `position`.

    Positions are the layer's `position_ids` where the model passes them (so a
    continuation over a KV cache counts on from the context), else 0..T-1.
    """
    layers = decoder_blocks(model)
    bad = sorted(i for i in deltas if not 0 <= i < len(layers))
    if bad:
        raise ValueError(f"steering layers {bad} out of range: the model has {len(layers)} layers")
    handles = []
    try:
        for index, delta in deltas.items():
            hook = _adder(delta, position)
            handles.append(layers[index].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adder(delta: Tensor, position: int):
    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # (N, T, D)
        shift = delta.to(hidden.dtype)  # (D,)
        if position > 0:
            steps = kwargs.get("position_ids")  # (N | 1, T)
            if steps is None:
                steps = torch.arange(hidden.shape[1], device=hidden.device)[None]
            shift = shift * (steps >= position).to(hidden.dtype)[..., None]  # (N | 1, T, D)
        hidden = hidden + shift
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


class SteeringVector(nn.Module):
    """v (D,) shared by all `layers`, one learnable scale per layer."""

    def __init__(self, layers: Sequence[int], dim: int) -> None:
        super().__init__()
        self.layers = tuple(int(layer) for layer in layers)
        # v starts at 0: step 0 is the unsteered model. Scales start at the seed's
        # early/mid/late [0.5, 1.0, 0.3] on three layers, else at 1.
        self.v = nn.Parameter(torch.zeros(dim))
        start = SEED_SCALES if len(self.layers) == len(SEED_SCALES) else (1.0,) * len(self.layers)
        self.scales = nn.Parameter(torch.tensor(start))

    def deltas(self, coefficient: float = 1.0) -> dict[int, Tensor]:
        """{layer: coefficient * scale * v}; differentiable w.r.t. v and the scales."""
        return {layer: coefficient * self.scales[i] * self.v for i, layer in enumerate(self.layers)}


# --- encoding and scoring ------------------------------------------------------------------


@dataclass(frozen=True)
class McBatch:
    context_ids: Tensor  # (B, Tc) right-padded
    context_mask: Tensor  # (B, Tc)
    ending_ids: Tensor  # (4B, Te) right-padded; rows 4b..4b+3 belong to question b
    ending_mask: Tensor  # (4B, Te)
    labels: Tensor  # (B,)

    def to(self, device: torch.device) -> McBatch:
        return McBatch(*(t.to(device) for t in vars(self).values()))


@dataclass(frozen=True)
class Encoded:
    """The token ids of a list of questions: context once, each ending on its own."""

    contexts: list[list[int]]
    endings: list[list[list[int]]]  # question -> ending -> ids
    labels: Tensor  # (N,)
    pad_id: int

    def __len__(self) -> int:
        return len(self.contexts)

    def subset(self, index: Sequence[int]) -> Encoded:
        return Encoded(
            [self.contexts[i] for i in index],
            [self.endings[i] for i in index],
            self.labels[list(index)],
            self.pad_id,
        )

    def with_contexts_of(self, source: Sequence[int]) -> Encoded:
        """The same endings and labels, question i asked after question `source[i]`'s
        context: with `source` a derangement, no question keeps its own."""
        if sorted(source) != list(range(len(self))):
            raise ValueError(f"need a permutation of the {len(self)} questions, got {source}")
        return Encoded([self.contexts[j] for j in source], self.endings, self.labels, self.pad_id)

    def batch(self, index: Sequence[int]) -> McBatch:
        contexts = [self.contexts[i] for i in index]
        endings = [end for i in index for end in self.endings[i]]
        return McBatch(
            *_pad(contexts, self.pad_id), *_pad(endings, self.pad_id), self.labels[list(index)]
        )


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids and mask, (R, max length)."""
    ids = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def encode(questions: Sequence[McQuestion], tokenizer: Any) -> Encoded:
    """Tokenize contexts (with the tokenizer's special tokens) and ` ending`s (without)."""
    if not questions:
        raise ValueError("no questions to encode")
    contexts = tokenizer([q.context for q in questions])["input_ids"]
    flat = tokenizer([" " + e for q in questions for e in q.endings], add_special_tokens=False)[
        "input_ids"
    ]
    endings = [flat[i : i + NUM_ENDINGS] for i in range(0, len(flat), NUM_ENDINGS)]
    empty = [q.id for q, ends in zip(questions, endings, strict=True) if not all(ends)]
    if empty:
        raise ValueError(f"endings that tokenize to nothing in questions {empty[:5]}")
    labels = torch.tensor([q.label for q in questions])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(contexts, endings, labels, pad)


def prompt_format(tokenizer: Any) -> str:
    """One line for the log: how `encode` builds what the model reads."""
    return (
        "prompts are raw text, no chat template: the context (tokenized with the tokenizer's "
        f"special tokens: {describe_start(tokenizer, [])}), then ' ' + each ending; an ending "
        "scores the mean log-probability of its tokens"
    )


def ending_scores(model: nn.Module, batch: McBatch) -> Tensor:
    """Mean log-probability of each ending's tokens given the context: (B, 4).

    The context runs once and its KV cache serves all 4 endings; only the states
    that predict an ending token go through the LM head, which keeps the
    (tokens x vocab) logits small for a 150k-token vocabulary.
    """
    base = model.base_model
    rows = torch.arange(len(batch.context_ids), device=batch.context_ids.device)
    lengths = batch.context_mask.sum(1)  # (B,)
    first = base(input_ids=batch.context_ids, attention_mask=batch.context_mask, use_cache=True)
    cache = first.cache
    cache.batch_repeat_interleave(NUM_ENDINGS)
    last = first.last_hidden_state[rows, lengths - 1].repeat_interleave(NUM_ENDINGS, 0)  # (4B, D)
    steps = torch.arange(batch.ending_ids.shape[1], device=lengths.device)
    second = base(
        input_ids=batch.ending_ids,
        attention_mask=torch.cat(
            [batch.context_mask.repeat_interleave(NUM_ENDINGS, 0), batch.ending_mask], 1
        ),
        position_ids=lengths.repeat_interleave(NUM_ENDINGS)[:, None] + steps,  # (4B, Te)
        cache=cache,
        use_cache=True,
    ).last_hidden_state  # (4B, Te, D)
    # The state predicting ending token k: the context's last for k = 0, else ending token k-1.
    predictors = torch.cat([last[:, None], second[:, :-1]], 1)  # (4B, Te, D)
    real = batch.ending_mask.bool()
    logits = model.get_output_embeddings()(predictors[real]).float()  # (K, V)
    token_lp = logits.log_softmax(-1).gather(1, batch.ending_ids[real][:, None]).squeeze(1)
    owner = real.nonzero()[:, 0]  # (K,) row of each scored token
    total = torch.zeros(len(real), device=token_lp.device).index_add_(0, owner, token_lp)
    return (total / real.sum(1)).view(-1, NUM_ENDINGS)


@torch.no_grad()
def mean_difference(
    model: nn.Module, data: Encoded, layers: Sequence[int], batch_size: int = 32
) -> dict[int, Tensor]:
    """The training-free contrast vector (contrastive activation addition), per layer.

    Each ending runs after its context; a row's activation at layer i is that layer's output
    averaged over the ending's tokens. The vector is the mean over questions of the right
    ending's activation minus the mean over questions of the wrong endings' mean.
    """
    blocks = decoder_blocks(model)
    device = model_device(model)
    seen: dict[int, Tensor] = {}

    def keep(index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen[index] = output[0] if isinstance(output, tuple) else output

        return hook

    sums: dict[int, Tensor] = {}
    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        for start in range(0, len(data), batch_size):
            index = range(start, min(start + batch_size, len(data)))
            rows = [data.contexts[i] + end for i in index for end in data.endings[i]]
            ids, mask = _pad(rows, data.pad_id)
            ending = torch.zeros_like(mask)  # (4B, T) 1 on the ending's tokens
            spans = [(len(data.contexts[i]), len(e)) for i in index for e in data.endings[i]]
            for r, (start_at, length) in enumerate(spans):
                ending[r, start_at : start_at + length] = 1
            model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
            right = torch.zeros(len(index), NUM_ENDINGS)
            right[torch.arange(len(index)), data.labels[list(index)]] = 1
            # Per question: +1 on the right ending, -1/3 on each wrong one; a (4B,) weight.
            weight = (right - (1 - right) / (NUM_ENDINGS - 1)).view(-1)
            share = ending.double() / ending.sum(1, keepdim=True)  # mean over the ending
            for layer in layers:
                hidden = seen[layer].detach().double().cpu()  # (4B, T, D)
                row_mean = torch.einsum("rt,rtd->rd", share, hidden)  # (4B, D)
                total = weight.double() @ row_mean  # (D,)
                sums[layer] = sums.get(layer, 0) + total
    finally:
        for handle in handles:
            handle.remove()
    dtype = model.get_input_embeddings().weight.dtype
    return {layer: (sums[layer] / len(data)).to(dtype) for layer in layers}


def model_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def predict(
    model: nn.Module, data: Encoded, deltas: Deltas, position: int = 0, batch_size: int = 32
) -> Tensor:
    """The chosen ending of every question (N,), under `deltas` (empty: unsteered)."""
    device = model_device(model)
    chosen = []
    with steer(model, deltas, position):
        for start in range(0, len(data), batch_size):
            index = range(start, min(start + batch_size, len(data)))
            chosen.append(ending_scores(model, data.batch(index).to(device)).argmax(1).cpu())
    return torch.cat(chosen)


def correct(
    model: nn.Module, data: Encoded, deltas: Deltas, position: int = 0, batch_size: int = 32
) -> Tensor:
    """Whether each question is answered right (N,) bool."""
    return predict(model, data, deltas, position, batch_size) == data.labels


# --- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorFit:
    val_correct: Tensor
    """(N_val,) bool after the last epoch."""
    train_loss: list[float]
    """Mean loss of each epoch."""

    @property
    def val_acc(self) -> float:
        return self.val_correct.double().mean().item()


def train_step(
    model: nn.Module,
    vector: SteeringVector,
    batch: McBatch,
    optimizer: torch.optim.Optimizer,
    position: int = 0,
) -> float:
    with steer(model, vector.deltas(), position):
        scores = ending_scores(model, batch)  # (B, 4)
    loss = F.cross_entropy(scores, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def train_vector(
    model: nn.Module,
    vector: SteeringVector,
    train: Encoded,
    val: Encoded,
    params: SteeringParams,
    desc: str = "steer",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> VectorFit:
    """Adam on v and the scales for `params.epochs`; then score val once. `on_epoch` gets
    {epoch, train_loss} after each epoch, then {epoch, val_acc} (the stage's dvclive logger)."""
    device = model_device(model)
    vector.to(device)
    optimizer = torch.optim.Adam(vector.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(params.seed)
    steps = -(-len(train) // params.batch_size)
    losses: list[float] = []
    with progress(total=params.epochs * steps, desc=desc, unit="step", leave=False) as bar:
        for epoch in range(1, params.epochs + 1):
            order = torch.randperm(len(train), generator=generator).tolist()
            total = 0.0
            for start in range(0, len(train), params.batch_size):
                batch = train.batch(order[start : start + params.batch_size]).to(device)
                total += train_step(model, vector, batch, optimizer, params.position)
                bar.update()
                bar.set_postfix(
                    loss=f"{total / (start // params.batch_size + 1):.4f}", refresh=False
                )
            losses.append(total / steps)
            if on_epoch is not None:
                on_epoch({"epoch": epoch, "train_loss": losses[-1]})
    right = correct(model, val, vector.deltas(), params.position, params.eval_batch_size)
    fit = VectorFit(right, losses)
    if on_epoch is not None:
        on_epoch({"epoch": params.epochs, "val_acc": fit.val_acc})
    log.info("%s: train loss %s, val acc %.4f", desc, [round(x, 4) for x in losses], fit.val_acc)
    return fit


# --- checkpoint ----------------------------------------------------------------------------


def save_vectors(
    folder: Path, vectors: Mapping[str, SteeringVector], config: dict[str, Any]
) -> None:
    """`folder/model.safetensors` ({name}.v, {name}.scales) + `folder/config.json`."""
    state = {}
    for name, vector in vectors.items():
        state[f"{name}.v"] = vector.v.float()
        state[f"{name}.scales"] = vector.scales.float()
    layers = {name: list(vector.layers) for name, vector in vectors.items()}
    save_checkpoint(folder, state, config | {"vectors": layers})


def load_vectors(folder: Path) -> tuple[dict[str, SteeringVector], dict[str, Any]]:
    """The vectors and config written by `save_vectors`."""
    config = read_config(folder, required=("vectors",))
    state = read_weights(folder)
    vectors = {}
    for name, layers in config["vectors"].items():
        if f"{name}.v" not in state or f"{name}.scales" not in state:
            raise ValueError(f"{Path(folder) / WEIGHTS} lacks the tensors of vector {name!r}")
        vector = SteeringVector(layers, state[f"{name}.v"].shape[0])
        vector.load_state_dict({"v": state[f"{name}.v"], "scales": state[f"{name}.scales"]})
        vectors[name] = vector
    return vectors, config

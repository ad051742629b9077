"""The guided LM's data: corpus chunks split by block, nested train prefixes, and the
concept words found in the token ids with the teacher's direction for each.

    split = split_chunks(corpus, eval_fraction=0.1)          # train / held-out rows by block
    split.train_prefix(0.25)                                 # chunks of the first 25% train blocks
    split.vocabulary                                         # (U,) tokenizer ids the chunks use
    finder = WordFinder(tokenizer, {"cat": 0}, split.vocabulary)  # concept text -> concept id
    finder.find([ids...])                                    # [(last-token position, concept id)]
    occ = find_occurrences(split.tokens, finder)             # Occurrences over all chunks

The LM holds only the vocabulary its corpus uses: `split_chunks` maps every tokenizer id
to its row in the sorted ids that occur in any chunk, train or held out (`vocabulary`,
looked up by `pipeline.common.token_table` as the concept students' tables are), so the
LM's embedding, head and softmax have U rows, not the tokenizer's 49K or 150K. Every
input and every target is one of those U ids by construction, so the loss is over the
same targets as with the full vocabulary; its softmax lacks only ids that no chunk holds
(a full-vocabulary LM would learn to give them almost nothing), and it is the same U for
every cell of the grid.

A word is a maximal run of letters and digits in the text the tokens decode to (each
token's surface string, its leading space kept), lowercased; a concept occurs where a
word equals its text, and the supervised position is the token holding the word's last
character. Words touching either end of a chunk may be cut by the chunk seam: skipped
(and counted). Special tokens (EOS) decode to a space, a word boundary.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from pipeline.common.splits import SPLITS, is_heldout
from pipeline.common.token_table import table_index
from pipeline.concepts.layout import DirectionSet
from pipeline.inputs.text_chunks import CorpusChunks

WORD = re.compile(r"[^\W_]+")
"""A word: a maximal run of letters and digits (underscore excluded)."""
ANCHOR = "a"
"""Decoded before each token so tokenizers that drop a leading space at the start of a
text (SentencePiece) still show it: surface(t) = decode([a, t]) minus decode([a])."""


def token_surfaces(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int] | None = None
) -> list[str]:
    """The text each of `token_ids` (default: the whole vocabulary) adds when it follows
    other text."""
    anchor = tokenizer.encode(ANCHOR, add_special_tokens=False)
    prefix = tokenizer.decode(anchor)
    special = set(tokenizer.all_special_ids)
    surfaces = []
    for token in range(len(tokenizer)) if token_ids is None else token_ids:
        if token in special:
            surfaces.append(" ")
            continue
        text = tokenizer.decode([*anchor, token], clean_up_tokenization_spaces=False)
        surfaces.append(text[len(prefix) :] if text.startswith(prefix) else text)
    return surfaces


class WordFinder:
    """Concept words in token ids: (position of the word's last token, concept id). With
    `vocabulary` (sorted tokenizer ids), `find` reads compact ids: row i of `vocabulary`."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        concepts: dict[str, int],
        vocabulary: Tensor | None = None,
    ):
        held = None if vocabulary is None else vocabulary.tolist()
        self.surfaces = token_surfaces(tokenizer, held)
        self.concepts = {text.lower(): cid for text, cid in concepts.items()}
        self.cut = 0
        """Words skipped so far because they touch a chunk's end (maybe cut by the seam)."""

    def find(self, token_ids: list[int]) -> list[tuple[int, int]]:
        pieces = [self.surfaces[t] if 0 <= t < len(self.surfaces) else " " for t in token_ids]
        owner = [i for i, piece in enumerate(pieces) for _ in piece]  # char -> token index
        text = "".join(pieces)
        found = []
        for match in WORD.finditer(text):
            concept = self.concepts.get(match.group().lower())
            if concept is None:
                continue
            if match.start() == 0 or match.end() == len(text):
                self.cut += 1
                continue
            found.append((owner[match.end() - 1], concept))
        return found


@dataclass(frozen=True)
class Occurrences:
    """Concept words found in chunks: one row per occurrence."""

    row: Tensor  # (N,) int64 row of the chunk in the token matrix
    position: Tensor  # (N,) int64 token position of the word's last token
    concept: Tensor  # (N,) int64 concept id

    def __len__(self) -> int:
        return self.row.numel()

    def select(self, keep: Tensor) -> Occurrences:
        return Occurrences(self.row[keep], self.position[keep], self.concept[keep])

    def in_rows(self, rows: Tensor) -> tuple[Tensor, Occurrences]:
        """The occurrences in `rows` (B,), with each one's index into `rows`. Needs `row`
        ascending, as `find_occurrences` builds it and `select` keeps it."""
        starts = torch.searchsorted(self.row, rows)
        counts = torch.searchsorted(self.row, rows, right=True) - starts
        index = torch.repeat_interleave(torch.arange(rows.numel()), counts)
        first = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
        picked = first + torch.arange(index.numel())
        return index, self.select(picked)


def find_occurrences(tokens: Tensor, finder: WordFinder) -> Occurrences:
    """Every concept word of every chunk row of `tokens` (R, T)."""
    rows, positions, concepts = [], [], []
    for row, ids in enumerate(tokens.tolist()):
        for position, concept in finder.find(ids):
            rows.append(row)
            positions.append(position)
            concepts.append(concept)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return Occurrences(as_long(rows), as_long(positions), as_long(concepts))


@dataclass(frozen=True)
class ChunkSplit:
    tokens: Tensor  # (R, T) int64 every chunk, in compact ids: rows of `vocabulary`
    vocabulary: Tensor  # (U,) int64 sorted tokenizer ids that occur in any chunk
    train_rows: Tensor  # (R_train,) int64 in block order
    heldout_rows: Tensor  # (R_heldout,) int64
    train_blocks: Tensor  # (R_train,) int64 block of each train row
    chunk_tokens: int

    def train_prefix(self, fraction: float) -> Tensor:
        """Rows of the first ceil(fraction x number of train blocks) train blocks: nested
        for growing fractions, whole blocks (no document split)."""
        blocks = torch.unique(self.train_blocks)
        count = max(1, math.ceil(fraction * blocks.numel() - 1e-9))
        return self.train_rows[torch.isin(self.train_blocks, blocks[:count])]


def held_vocabulary(tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The sorted ids that occur in `tokens` (U,), and `tokens` as rows of them (same shape)."""
    vocabulary = torch.unique(tokens)
    every = torch.ones_like(tokens, dtype=torch.bool)
    return vocabulary, table_index(vocabulary, tokens, every, "the ids the chunks use")


def split_chunks(corpus: CorpusChunks, eval_fraction: float) -> ChunkSplit:
    """All chunks in memory (R, T) in compact ids, split into train and held-out by block."""
    tokens = corpus.read(0, len(corpus))
    chunk_ids = corpus.chunk_ids(0, len(corpus))
    order = torch.argsort(chunk_ids)
    tokens, chunk_ids = tokens[order], chunk_ids[order]
    held = is_heldout(chunk_ids, eval_fraction, corpus.block_chunks)
    rows = torch.arange(chunk_ids.numel())
    if held.all() or not held.any():
        raise ValueError(
            f"{corpus.folder}: guided_lm.eval_fraction={eval_fraction} holds out "
            f"{int(held.sum())} of {held.numel()} chunks; change it or store more chunks"
        )
    blocks = torch.div(chunk_ids, corpus.block_chunks, rounding_mode="floor")
    vocabulary, compact = held_vocabulary(tokens)
    return ChunkSplit(
        compact, vocabulary, rows[~held], rows[held], blocks[~held], corpus.chunk_tokens
    )


@dataclass(frozen=True)
class ConceptTargets:
    """Teacher directions of the concepts by id, and each concept's split."""

    texts: dict[str, int]  # lowercased text -> concept id (single words only)
    directions: Tensor  # (C, D) float32, row = concept id; 0 where the split is not loaded
    split: Tensor  # (C,) int64 code of SPLITS
    skipped: int  # concepts whose text is not one word (never found)

    def of_split(self, occurrences: Occurrences, split: str) -> Occurrences:
        return occurrences.select(self.split[occurrences.concept] == SPLITS.index(split))


def concept_targets(directions: Path, layer: int) -> ConceptTargets:
    """Concept texts and directions (`directions` at `layer`), both from the directions
    folder, which stores each concept's text beside its vectors."""
    data = DirectionSet(directions, layer)
    size = data.num_concepts
    split = torch.full((size,), -1, dtype=torch.long)
    vectors = torch.zeros(size, data.dim)
    for code, name in enumerate(SPLITS):
        ids, rows = data.load_split(name)
        vectors[ids] = rows
        split[ids] = code
    texts, skipped = {}, 0
    every = torch.arange(size)
    for cid, text in zip(every.tolist(), data.concept_texts(every), strict=True):
        if WORD.fullmatch(text) and split[cid] >= 0:
            texts[text.lower()] = cid
        else:
            skipped += 1
    return ConceptTargets(texts, vectors, split, skipped)

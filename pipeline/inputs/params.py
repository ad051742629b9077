"""Params of the shared inputs: sections `wordlist`, `corpus` and `teachers`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.common.params import positive
from pipeline.common.splits import SplitFractions


@dataclass(frozen=True)
class WordlistParams:
    source: Literal["nltk", "wordfreq"] = "nltk"
    """`nltk`: the NLTK `words` corpus with WordNet POS/category (downloads);
    `wordfreq`: the English list shipped by the wordfreq package (offline)."""
    num_concepts: int = 50_000
    """How many concepts to keep, most frequent first."""
    min_length: int = 3
    max_length: int = 20
    splits: SplitFractions = field(default_factory=SplitFractions)
    split_salt: str = ""
    """Mixed into the split hash; change it to draw a different, still stable split."""
    split_by: Literal["text", "stem"] = "text"
    """What the split hash is taken of: `text`, the word itself; `stem`, its Snowball
    English stem, so all inflections of one stem (year/years) fall in one split and test
    words never share a stem with train words."""

    def __post_init__(self) -> None:
        positive("wordlist.num_concepts", self.num_concepts)
        positive("wordlist.min_length", self.min_length)
        if self.max_length < self.min_length:
            raise ValueError(
                f"wordlist.max_length ({self.max_length}) is below wordlist.min_length "
                f"({self.min_length})"
            )


@dataclass(frozen=True)
class CorpusParams:
    """Section `corpus`: text tokenized into fixed-length chunks for the token-level branches."""

    source: Literal["builtin", "hf", "files"] = "hf"
    """`builtin`: English-like sentences drawn from wordfreq with a seeded RNG (offline);
    `hf`: a Hugging Face dataset, streamed (needs `pip install datasets` and the hub);
    `files`: local UTF-8 text files matched by `files`, one document per file."""
    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Whose tokenizer: a hub id or a local model folder."""
    revision: str = "main"
    dataset: str = "HuggingFaceFW/fineweb-edu"
    dataset_config: str | None = "sample-10BT"
    dataset_split: str = "train"
    text_field: str = "text"
    files: str = "data/text/*.txt"
    """Glob for `source: files`, relative to the working directory, read in sorted order."""
    seed: int = 0
    """Seed of the `builtin` text generator."""
    chunk_tokens: int = 273
    """Tokens per chunk; trajectories need num_windows * window_size + num_queries + 1."""
    max_chunks: int = 2048
    """Stop after this many chunks (fewer if the source runs out)."""
    block_chunks: int = 16
    """Chunks per block, the unit the sidecar and the SAE split into train and held-out.
    At each block seam the rest of the current document is skipped (counted), so no
    document has tokens in two blocks. Larger blocks skip fewer tokens but give fewer
    split units: keep max_chunks / block_chunks well above 1 / each eval_fraction."""
    shard_rows: int = 65_536

    def __post_init__(self) -> None:
        positive("corpus.max_chunks", self.max_chunks)
        positive("corpus.block_chunks", self.block_chunks)
        positive("corpus.shard_rows", self.shard_rows)
        if self.chunk_tokens < 2:
            raise ValueError(f"corpus.chunk_tokens must be >= 2, got {self.chunk_tokens}")


TinyRecipe = Literal["qwen3", "llama"]


@dataclass(frozen=True)
class TeachersParams:
    """Section `teachers`: random-weight teachers built locally (stage `teachers`)."""

    tiny: dict[str, TinyRecipe] = field(default_factory=dict)
    """Folder name -> recipe: `qwen3` (a small Qwen3ForCausalLM) or `llama` (a small
    LlamaForCausalLM with grouped-query attention). Each becomes data/teachers/<name>,
    loaded by path. Empty in the real experiment, which loads pretrained models."""

    def __post_init__(self) -> None:
        for name in self.tiny:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"teachers.tiny key {name!r} must be a plain folder name")

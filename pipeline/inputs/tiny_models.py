"""Tiny teachers built offline and deterministically, for the tiny profile and tests.

`tiny:qwen3` is a `Qwen3ForCausalLM` from a small `Qwen3Config`, `tiny:llama` a
`LlamaForCausalLM` with grouped-query attention like TinyLlama; both have random
weights (seeded) and a byte-level BPE tokenizer trained here on the wordfreq
English list. Same architecture code paths as the real models, no network.

    model, tokenizer = build_tiny("tiny:qwen3")
    save_tiny("tiny:qwen3", Path("models/tiny-qwen3"))  # then load it by path
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
import wordfreq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

PREFIX = "tiny:"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_WORDS = 30_000
TOKENIZER_VOCAB = 2_048
SEED = 1234


def is_tiny(model_id: str) -> bool:
    return model_id.startswith(PREFIX)


def tiny_qwen3_config(vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def tiny_llama_config(vocab_size: int) -> LlamaConfig:
    """TinyLlama's shape in miniature: grouped-query attention, 4 query heads per KV head."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )


RECIPES = {
    "qwen3": (tiny_qwen3_config, Qwen3ForCausalLM),
    "llama": (tiny_llama_config, LlamaForCausalLM),
}


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on wordfreq's most frequent English words (deterministic)."""
    words = [w for w in wordfreq.top_n_list("en", TOKENIZER_WORDS) if w.isascii()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Words appear with and without a leading space, as they do inside prompts.
    tokenizer.train_from_iterator(words + [" " + w for w in words], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)


def build_tiny(model_id: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    name = model_id.removeprefix(PREFIX)
    if name not in RECIPES:
        raise ValueError(
            f"unknown tiny model {model_id!r}; known: {', '.join(PREFIX + k for k in RECIPES)}"
        )
    make_config, model_class = RECIPES[name]
    tokenizer = train_tokenizer()
    config = make_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    # fork_rng keeps the caller's random stream untouched by the seeded init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config).eval()
    return model, tokenizer


def save_tiny(model_id: str, out: Path) -> Path:
    """Write a tiny teacher as a normal HF model directory (loadable by path)."""
    model, tokenizer = build_tiny(model_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def command(
    out: Annotated[Path, typer.Option(help="Folder to write the model and tokenizer to.")],
    model: Annotated[str, typer.Option(help="Which tiny teacher to build.")] = "tiny:qwen3",
) -> None:
    """Save a tiny teacher as an ordinary HF model folder (then load it by path)."""
    typer.echo(f"wrote {save_tiny(model, out)}")

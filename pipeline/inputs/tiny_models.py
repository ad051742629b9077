"""Tiny teachers built offline and deterministically, for the tiny profile and tests.

Recipe `qwen3` is a `Qwen3ForCausalLM` from a small `Qwen3Config`, `llama` a
`LlamaForCausalLM` with grouped-query attention like TinyLlama; both have random
weights (seeded) and a byte-level BPE tokenizer trained here on the wordfreq
English list. Same architecture code paths as the real models, no network. Stage
`teachers` saves them as model folders, which every other stage loads by path. Their
config.json carries RANDOM_WEIGHTS_KEY: true, so reports can say their teacher was never
trained (`pipeline.common.teacher.teacher_caveat`).

    model, tokenizer = build_tiny("qwen3")
    save_tiny("qwen3", Path("data/teachers/tiny-qwen3"))  # then load it by path
"""

from __future__ import annotations

from pathlib import Path

import torch
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

from pipeline.common.teacher import RANDOM_WEIGHTS_KEY

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TOKENIZER_WORDS = 30_000
TOKENIZER_VOCAB = 2_048
SEED = 1234


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


def build_tiny(recipe: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The causal LM of `recipe` (a key of RECIPES) with seeded weights, and its tokenizer."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown tiny teacher recipe {recipe!r}; known: {', '.join(RECIPES)}")
    make_config, model_class = RECIPES[recipe]
    tokenizer = train_tokenizer()
    config = make_config(len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    setattr(config, RANDOM_WEIGHTS_KEY, True)
    # fork_rng keeps the caller's random stream untouched by the seeded init.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config).eval()
    return model, tokenizer


def save_tiny(recipe: str, out: Path) -> Path:
    """Write a tiny teacher as a normal HF model directory (loadable by path)."""
    model, tokenizer = build_tiny(recipe)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

"""What sits at position 0 of a sequence, and what separates documents.

Decoder LMs make position 0 an attention sink: its hidden state has a norm hundreds of
times the others' in a few dimensions, whatever the token. A model trained with a BOS
token meets that sink on the BOS; a model whose tokenizer adds none (Qwen3, SmolLM2)
meets it on the first real token, so a concept prompt `"{concept}"` pooled at its last
token, or a corpus chunk's first row, would measure the sink instead of the text.

One rule for every stage that builds sequences (`directions` prompts, `corpus` chunks):
the `start_token` param names the token put before each sequence.

- `auto`: nothing when the tokenizer adds a special token at position 0 itself (Llama's
  `<s>`, BERT's `[CLS]`); otherwise the model's end-of-text token (END_OF_TEXT when the
  vocabulary has it, as Qwen3's, SmolLM2's and GPT-2's do; else its `eos_token`), the
  token that preceded every document in pretraining.
- `none`: nothing; position 0 is the first token of the text.
- any other string: that token, which must be one token of the vocabulary.

    ids = start_ids(tokenizer, "auto")    # [0] for SmolLM2: <|endoftext|>
    sep = end_of_text_id(tokenizer)       # what joins documents in a corpus
    stream_start_ids(tokenizer, "auto")   # a corpus chunk's: [1] (<s>) for Llama 2, else as above
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

END_OF_TEXT = "<|endoftext|>"
AUTO = "auto"
NONE = "none"


def adds_start_token(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer itself puts a special token at position 0 of an encoded text."""
    with_special = tokenizer("a", add_special_tokens=True).input_ids
    plain = tokenizer("a", add_special_tokens=False).input_ids
    return (
        len(with_special) > len(plain)
        and with_special[0] in set(tokenizer.all_special_ids)
        and with_special[: len(plain)] != plain
    )


def end_of_text_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a document: END_OF_TEXT if the vocabulary has it, else eos."""
    # The round trip tells a real entry from the unknown-token id a missing one maps to; an
    # unk_token test would not: SmolLM2's GGUF tokenizer makes <|endoftext|> its unk_token.
    vocab_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if isinstance(vocab_id, int) and vocab_id >= 0:
        if tokenizer.convert_ids_to_tokens(vocab_id) == END_OF_TEXT:
            return vocab_id
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"the tokenizer has neither {END_OF_TEXT!r} nor an eos_token to end documents"
        )
    return int(tokenizer.eos_token_id)


def start_ids(
    tokenizer: PreTrainedTokenizerBase, start_token: str, key: str = "start_token"
) -> list[int]:
    """The ids to put before a sequence encoded with `add_special_tokens=True`, per the
    module's rule; `key` names the param in errors."""
    if start_token == NONE:
        return []
    if start_token == AUTO:
        return [] if adds_start_token(tokenizer) else [end_of_text_id(tokenizer)]
    ids = tokenizer(start_token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(
            f"{key}={start_token!r} is {len(ids)} tokens for this tokenizer; it must be one "
            f"token (or {AUTO!r}, {NONE!r})"
        )
    return ids


def stream_start_ids(
    tokenizer: PreTrainedTokenizerBase, start_token: str, key: str = "start_token"
) -> list[int]:
    """The ids to put before a sequence cut from a stream encoded without special tokens
    (a corpus chunk): as `start_ids`, except that `auto` gives the tokenizer's own start
    token (Llama's `<s>`) where it adds one, since nothing else would put it there."""
    if start_token == AUTO and adds_start_token(tokenizer):
        return tokenizer("a", add_special_tokens=True).input_ids[:1]
    return start_ids(tokenizer, start_token, key)


def describe_start(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """One phrase for a log line: what position 0 holds."""
    if ids:
        return f"{tokenizer.convert_ids_to_tokens(ids[0])!r} prepended at position 0"
    if adds_start_token(tokenizer):
        first = tokenizer("a", add_special_tokens=True).input_ids[0]
        return f"the tokenizer's own {tokenizer.convert_ids_to_tokens(first)!r} at position 0"
    return "no start token: position 0 is the text's first token (an attention sink)"

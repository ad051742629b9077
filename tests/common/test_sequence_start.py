"""Position 0's token: the rule of pipeline/common/sequence_start.py on real tokenizers."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from pipeline.common.sequence_start import (
    adds_start_token,
    describe_start,
    end_of_text_id,
    start_ids,
    stream_start_ids,
)


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_qwen3_path):
    return AutoTokenizer.from_pretrained(tiny_qwen3_path)


@pytest.fixture(scope="module")
def encoder_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


def test_decoder_without_bos_gets_end_of_text(tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert not adds_start_token(tiny_tokenizer)
    assert end_of_text_id(tiny_tokenizer) == eot
    assert start_ids(tiny_tokenizer, "auto") == [eot]
    assert start_ids(tiny_tokenizer, "none") == []
    assert "'<|endoftext|>' prepended" in describe_start(tiny_tokenizer, [eot])
    assert "attention sink" in describe_start(tiny_tokenizer, [])


def test_encoder_adds_its_own_start(encoder_tokenizer):
    assert adds_start_token(encoder_tokenizer)
    assert start_ids(encoder_tokenizer, "auto") == []
    assert "'[CLS]'" in describe_start(encoder_tokenizer, [])


def test_explicit_token_must_be_one_token(tiny_tokenizer):
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert start_ids(tiny_tokenizer, "<|endoftext|>") == [eot]
    with pytest.raises(ValueError, match=r"directions.start_token='hello world' is \d+ tokens"):
        start_ids(tiny_tokenizer, "hello world", key="directions.start_token")


def test_end_of_text_is_found_even_where_it_is_the_unk_token(tiny_qwen3_path):
    # SmolLM2's tokenizer (from its GGUF): unk_token <|endoftext|> (0), eos <|im_end|> (2).
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_qwen3_path, unk_token="<|endoftext|>", eos_token="<|pad|>"
    )
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert tokenizer.unk_token_id == eot != tokenizer.eos_token_id
    assert end_of_text_id(tokenizer) == eot
    assert start_ids(tokenizer, "auto") == [eot]


def test_a_stream_chunk_gets_the_tokenizers_own_start_token(encoder_tokenizer, tiny_tokenizer):
    cls = encoder_tokenizer.cls_token_id
    assert stream_start_ids(encoder_tokenizer, "auto") == [cls]
    assert stream_start_ids(encoder_tokenizer, "none") == []
    eot = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert stream_start_ids(tiny_tokenizer, "auto") == [eot]

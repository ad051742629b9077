"""Stage `guided_lm` end to end on a tiny corpus, and its report on hand-built cells."""

from __future__ import annotations

import json

import pytest
import wordfreq

from pipeline.common.intervals import t_interval
from pipeline.common.summary import check_entry
from pipeline.guided_lm import guided_lm as stage
from pipeline.guided_lm.model import build_lm, count_parameters
from pipeline.guided_lm.params import GuidedLmParams
from pipeline.guided_lm.report import BUILTIN_CAVEAT, aggregate, guided_table, summary
from pipeline.inputs import corpus as corpus_stage
from pipeline.inputs.params import CorpusParams
from tests.conftest import build_params, make_direction_set
from tests.guided_lm.test_guided_lm import SMALL
from tests.tables import squeeze


def _cells(losses: dict[tuple[float, float], list[float]]) -> list[dict]:
    return [
        {
            "fraction": fraction,
            "train_tokens": int(fraction * 1000),
            "lambda": lam,
            "seed": seed,
            "heldout_loss": loss,
            "aux_cos_train": None if lam == 0 else 0.5,
            "aux_cos_test": None if lam == 0 else 0.1,
            "probe_cos_train": 0.4,
            "probe_cos_test": 0.0,
        }
        for (fraction, lam), values in losses.items()
        for seed, loss in enumerate(values)
    ]


def test_rows_hold_the_mean_the_t_interval_and_the_paired_difference():
    cells = _cells(
        {
            (0.5, 0.0): [5.0, 6.0, 7.0],
            (0.5, 0.1): [4.0, 5.5, 7.0],
            (1.0, 0.0): [3.0, 3.0, 3.3],
            (1.0, 0.1): [2.9, 3.1, 3.0],
        }
    )
    rows = aggregate(cells)
    assert [(r["fraction"], r["lambda"]) for r in rows] == [(0.5, 0), (0.5, 0.1), (1, 0), (1, 0.1)]
    small = rows[1]
    assert small["heldout_loss"] == pytest.approx(5.5)
    assert small["heldout_loss_interval"] == pytest.approx(list(t_interval([4.0, 5.5, 7.0])))
    assert small["difference"] == pytest.approx(-0.5)  # (-1, -0.5, 0) paired by seed
    assert small["difference_interval"] == pytest.approx(list(t_interval([-1.0, -0.5, 0.0])))
    assert rows[0]["difference"] is None
    counts = {"heldout_train_occurrences": 450, "heldout_test_occurrences": 12}
    metrics = {"rows": rows, "lambdas": [0.0, 0.1], "teacher": {"model": "m"}, "caveat": ""}
    entries = summary(metrics | {"counts": counts}, min_rows=30)
    for index, entry in enumerate(entries):
        check_entry(entry, f"summary[{index}]")
    largest, smallest, cos = entries
    assert (largest["value"], largest["control_value"]) == pytest.approx((3.0, 3.1))
    assert smallest["downstream_value"] == pytest.approx(-0.5) and smallest["n"] == 3
    assert (cos["value"], cos["control_value"]) == pytest.approx((0.5, 0.4))
    assert cos["interval"] == pytest.approx([0.5, 0.5])  # the same 0.5 for every seed
    assert (cos["rows"], cos["min_rows"]) == (450, 30)


def test_the_table_names_its_rows_marks_too_few_and_keeps_one_precision():
    cells = _cells({(1.0, 0.0): [3.0, 3.0, 3.3], (1.0, 0.1): [2.9, 3.1, 3.0]})
    counts = {
        "parameters": 1000,
        "vocabulary": 500,
        "tokenizer_vocabulary": 49152,
        "steps": 5,
        "batch_size": 2,
        "heldout_chunks": 30,
        "heldout_tokens": 2160,
        "seeds": 3,
        "supervising_occurrences": 99,
        "heldout_train_occurrences": 450,
        "heldout_test_occurrences": 12,
    }
    metrics = {
        "rows": aggregate(cells),
        "counts": counts,
        "teacher": {"model": "m", "layer": 2},
        "caveat": "",
    }
    lines = squeeze(guided_table(metrics, min_rows=30)).splitlines()
    assert "its vocabulary the 500 token ids the chunks use, of the tokenizer's 49,152" in lines[2]
    assert lines[4:] == [
        "| train tokens | lambda | held-out loss [interval] (n=30) | "
        "difference vs lambda=0 [interval] | aux cos train (n=450) / test (n=12) | "
        "probe cos train (n=450) / test (n=12) |",
        lines[5],
        # 3.1 +- 4.303 * 0.1, the difference (-0.1, 0.1, -0.3): -0.1 +- 4.303 * 0.1155; four
        # decimals throughout, a difference signed; the 12 test occurrences are too few.
        "| 1,000 | 0 | 3.1000 [2.6697, 3.5303] | — | — / n=12 < 30 | 0.4000 / n=12 < 30 |",
        "| 1,000 | 0.1 | 3.0000 [2.7516, 3.2484] | -0.1000 [-0.5968, +0.3968] | "
        "0.5000 / n=12 < 30 | 0.4000 / n=12 < 30 |",
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_path):
    root = tmp_path_factory.mktemp("guided")
    corpus_params = CorpusParams(
        source="builtin", model=tiny_llama_path, chunk_tokens=37, max_chunks=40, block_chunks=2
    )
    corpus_stage.run(corpus_params, root / "corpus")
    words = [w for w in wordfreq.top_n_list("en", 400) if w.isalpha() and len(w) >= 3][:240]
    make_direction_set(root / "directions", num_concepts=len(words), layer=2, texts=words)
    return root


def test_the_stage_writes_every_cell_and_its_report(inputs, tmp_path):
    params = build_params(
        guided_lm={**SMALL, "seeds": [0, 1], "eval_fraction": 0.25},
        directions={"layers": [2]},
        distill={"train": {"layer": 2}},
    )
    out = {name: tmp_path / name for name in ("m.json", "t.md", "p.png", "c.tsv")}
    results = stage.run(
        params,
        inputs / "corpus",
        inputs / "directions",
        *out.values(),
    )
    assert json.loads(out["m.json"].read_text()) == json.loads(json.dumps(results))
    assert len(results["cells"]) == 2 * 3 * 2 and len(results["rows"]) == 6
    tokens = [r["train_tokens"] for r in results["rows"] if r["lambda"] == 0]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1]  # nested prefixes
    for cell in results["cells"]:
        assert (cell["aux_cos_train"] is None) == (cell["lambda"] == 0)
        assert 0 < cell["heldout_loss"] < 20
    counts = results["counts"]
    assert counts["supervising_occurrences"] > 0
    # The LM holds only the ids its chunks use: embedding + head shrink with them.
    assert 0 < counts["vocabulary"] < counts["tokenizer_vocabulary"]
    full = count_parameters(build_lm(GuidedLmParams(**SMALL), counts["tokenizer_vocabulary"], 0))
    saved = 2 * SMALL["d_model"] * (counts["tokenizer_vocabulary"] - counts["vocabulary"])
    assert counts["parameters"] == full - saved
    assert results["caveat"] == BUILTIN_CAVEAT
    for index, entry in enumerate(results["summary"]):
        check_entry(entry, f"summary[{index}]")
    assert out["c.tsv"].read_text().splitlines()[0] == "train_tokens\tlambda_0\tlambda_0p1"
    assert BUILTIN_CAVEAT in out["t.md"].read_text().splitlines()[0]
    assert out["p.png"].read_bytes()[:4] == b"\x89PNG"


def test_the_stage_refuses_a_corpus_without_held_out_blocks(inputs, tmp_path):
    params = build_params(
        guided_lm={**SMALL, "eval_fraction": 0.001},
        directions={"layers": [2]},
        distill={"train": {"layer": 2}},
    )
    paths = [tmp_path / name for name in ("m.json", "t.md", "p.png", "c.tsv")]
    with pytest.raises(ValueError, match="guided_lm.eval_fraction=0.001 holds out 0 of"):
        stage.run(params, inputs / "corpus", inputs / "directions", *paths)

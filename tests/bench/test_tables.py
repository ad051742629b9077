"""bench/tables.py: a README section is replaced whole; a missing marker is an error."""

from __future__ import annotations

import pytest

from bench.tables import command, directions_table, replace_between


def test_the_section_between_the_markers_is_replaced_whole():
    text = "intro\n<!-- gpu -->\nold table\nold note\n<!-- /gpu -->\nafter\n"
    assert replace_between(text, "gpu", "new") == "intro\n<!-- gpu -->\nnew\n<!-- /gpu -->\nafter\n"


@pytest.mark.parametrize(
    "text",
    ["no markers", "<!-- /gpu --> before <!-- gpu -->", "<!-- gpu --><!-- gpu --><!-- /gpu -->"],
)
def test_missing_reversed_or_repeated_markers_are_refused(text):
    with pytest.raises(ValueError, match="bench/README.md must hold <!-- gpu --> once"):
        replace_between(text, "gpu", "new", "bench/README.md")


def test_a_skipped_peer_is_a_row_that_says_why():
    machine = {"cpu": "AMD EPYC", "cpu_flags": ["avx2"], "threads": 2, "torch": "2.13"}
    timed = {
        "concepts_per_s": 40.0, "concepts_per_s_per_round": [39.0, 41.0],
        "project_speedup": 1.0, "project_speedup_per_round": [1.0, 1.0],
        "max_rel_error_vs_fp32": 6e-7, "executed_gflop": 900.0, "executed_gflop_per_s": 110.0,
        "executed_pct_of_matmul": 90.0, "required_gflop_per_s": 150.0, "peak_gb": 3.0,
        "model_gb": 2.5, "memory_measure": "VmHWM",
    }  # fmt: skip
    results = {
        "benchmark": "directions", "concepts": 300, "reference_concepts": 100, "templates": 2,
        "layer": 21, "dtype": "float32", "device": "cpu", "smoke": False, "batch_size": 64,
        "repeats": 2, "machine": machine, "matmul_gflop_per_s": 122.0,
        "matmul_gflop_per_s_range": [110.0, 130.0], "required_gflop": 1200.0,
        "methods": {"project": timed, "nnsight": {"skipped": "nnsight is not installed"}},
    }  # fmt: skip
    table = directions_table(results)
    row = "| project | 40.0 (39.0 / 41.0) | **1.00x** (1.00 / 1.00) | not recorded | 6.0e-07 |"
    assert row in table
    assert "| nnsight | nnsight is not installed |" in table
    assert "CPU flags: avx2" in table and "122 GFLOP/s on average (110-130)" in table
    assert command(results) == (
        "python -m bench.bench_directions --concepts 300 --reference-concepts 100 "
        "--batch-size 64 --repeats 2 --dtype float32 --device cpu"
    )

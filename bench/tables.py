"""The benchmark tables of bench/README.md, rendered from the results JSON.

A table lives between `<!-- NAME -->` and `<!-- /NAME -->` in the README and is
replaced whole, so a rerun never leaves a stale row:

    python -m bench.tables --readme bench/README.md --marker cpu-directions \
        bench/results/directions_cpu_float32_300.json bench/results/directions_cpu_bfloat16_300.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _rounds(values: list[float], digits: int) -> str:
    return " / ".join(f"{v:.{digits}f}" for v in values)


def machine_line(results: dict) -> str:
    machine = results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['threads']} threads"
    flags = ", ".join(machine["cpu_flags"]) or "none of " + "/".join(("avx2", "avx512_bf16"))
    size = " (`--smoke`: a 16x narrower model, not a speed figure)" if results["smoke"] else ""
    return (
        f"{results['dtype']} on {where} (CPU flags: {flags}), torch {machine['torch']}, "
        f"{results['repeats']} interleaved round(s), each method in its own process; "
        f"{results['dtype']} matmul measured beside each method in its process: "
        f"{results['matmul_gflop_per_s']:.0f} GFLOP/s on average "
        f"({results['matmul_gflop_per_s_range'][0]:.0f}-{results['matmul_gflop_per_s_range'][1]:.0f})"
        f"{size}"
    )


def directions_table(results: dict) -> str:
    header = (
        "| method | concepts/s (per round) | project speedup (per round) | in CPU time | max "
        "rel. error vs fp32 | executed GFLOP | executed GFLOP/s | % of matmul | required "
        "GFLOP/s | peak memory GB (model) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for name, m in results["methods"].items():
        if "concepts_per_s" not in m:
            why = m.get("skipped") or f"failed: {m['failed']}"
            rows.append(f"| {name} | {why} | | | | | | | | |")
            continue
        cpu = m.get("project_cpu_time_ratio")
        cpu = f"{cpu:.2f}x" if cpu else "not recorded"
        rows.append(
            f"| {name} | {m['concepts_per_s']:.1f} ({_rounds(m['concepts_per_s_per_round'], 1)})"
            f" | **{m['project_speedup']:.2f}x** ({_rounds(m['project_speedup_per_round'], 2)})"
            f" | {cpu} | {m['max_rel_error_vs_fp32']:.1e} | {m['executed_gflop']:,.0f}"
            f" | {m['executed_gflop_per_s']:.0f} | {m['executed_pct_of_matmul']:.0f}%"
            f" | {m['required_gflop_per_s']:.0f}"
            f" | {m['peak_gb']:.2f} ({m['model_gb']:.2f}, {m['memory_measure']}) |"
        )
    what = (
        f"`directions`: {results['concepts']:,} concepts x {results['templates']} templates, "
        f"layer {results['layer']}, error on the first {results['reference_concepts']}; "
        f"required work {results['required_gflop']:,.0f} GFLOP. {machine_line(results)}"
    )
    return "\n".join([what, "", header, *rows])


def trajectories_table(results: dict) -> str:
    header = (
        "| method | chunks/s (per round) | CPU s per chunk | fastest project speedup | max rel. "
        "diff vs project | bytes/window/layer (bf16) | peak memory GB (model) |\n"
        "|---|---:|---:|---:|---|---:|---:|"
    )
    rows = []
    for name, m in results["methods"].items():
        if "chunks_per_s" not in m:
            why = m.get("skipped") or f"failed: {m['failed']}"
            rows.append(f"| {name} | {why} | | | | | |")
            continue
        diffs = m.get("max_rel_diff_vs_project", {})
        agree = ", ".join(f"{k} {v:.1e}" for k, v in sorted(diffs.items()))
        agree = agree or ("(reference)" if name.startswith("project_") else "not checked")
        size = m.get("bytes_per_window_per_layer_bf16")
        cpu = sum(m["cpu_seconds_per_round"]) / len(m["cpu_seconds_per_round"]) / results["chunks"]
        rows.append(
            f"| {name} | {m['chunks_per_s']:.3f} ({_rounds(m['chunks_per_s_per_round'], 3)})"
            f" | {cpu:.0f}"
            f" | {m['fastest_project_speedup']:.2f}x | {agree}"
            f" | {f'{size:,.0f}' if size else ''}"
            f" | {m['peak_gb']:.2f} ({m['model_gb']:.2f}, {m['memory_measure']}) |"
        )
    what = (
        f"`trajectories`: {results['chunks']} chunks, layers {results['layers']}, project "
        f"batches of {results['batch_size']}. " + machine_line(results)
    )
    return "\n".join([what, "", header, *rows])


TABLES = {"directions": directions_table, "trajectories": trajectories_table}


def command(results: dict) -> str:
    """The command line that reproduces `results` (every argument that shapes them)."""
    if results["benchmark"] == "directions":
        reference = results["reference_concepts"]
        sizes = f"--concepts {results['concepts']} --reference-concepts {reference}"
    else:
        layers = ",".join(str(layer) for layer in results["layers"])
        sizes = f"--chunks {results['chunks']} --layers {layers}"
    return (
        f"python -m bench.bench_{results['benchmark']} {sizes} --batch-size {results['batch_size']}"
        f" --repeats {results['repeats']} --dtype {results['dtype']} --device {results['device']}"
        + (" --smoke" if results["smoke"] else "")
    )


def render(paths: list[Path]) -> str:
    blocks = []
    for path in paths:
        results = json.loads(path.read_text())
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
        table = TABLES[results["benchmark"]](results)
        blocks.append(f"`{command(results)} --json {shown}`\n\n{table}")
    return "\n\n".join(blocks)


def replace_between(text: str, marker: str, body: str, where: str = "the README") -> str:
    """`text` with what lies between `<!-- marker -->` and `<!-- /marker -->` replaced."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{where} must hold {start} once, followed by {end} once")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--readme", type=Path, help="write between the markers here")
    parser.add_argument("--marker", help="the README section, e.g. cpu-directions")
    args = parser.parse_args()
    body = render(args.results)
    if args.readme:
        text = replace_between(args.readme.read_text(), args.marker, body, str(args.readme))
        args.readme.write_text(text)
    print(body)


if __name__ == "__main__":
    main()

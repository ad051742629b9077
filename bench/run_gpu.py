"""The GPU tables of bench/README.md: both benchmarks at real size in bf16, with the peers.

One prepared run for a lent GPU: `directions` (2,000 concepts, 2 interleaved rounds)
and `trajectories` (16 chunks), bf16, every peer that is installed; the JSON goes to
bench/results/ and the tables replace what lies between the README's `gpu` markers,
headed by the GPU's name.

    pip install -e '.[bench]'                       # the peers
    python -m bench.run_gpu                         # on the GPU: writes bench/README.md
    python -m bench.run_gpu --device cpu --smoke    # checks this script on a CPU in minutes
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from bench import bench_directions, bench_trajectories
from bench.tables import render, replace_between

BENCH = Path(__file__).resolve().parent
README = BENCH / "README.md"


def sizes(smoke: bool) -> tuple[list[str], list[str]]:
    """Arguments of each benchmark: the real sizes, or a few rows that check the script."""
    if smoke:
        return (
            ["--concepts", "16", "--reference-concepts", "8", "--repeats", "1", "--smoke"],
            ["--chunks", "2", "--batch-size", "2", "--repeats", "1", "--smoke"],
        )
    return (
        ["--concepts", "2000", "--reference-concepts", "200", "--repeats", "2"],
        ["--chunks", "16", "--batch-size", "4", "--repeats", "1"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes; results in a temporary folder"
    )
    args = parser.parse_args()
    common = ["--device", args.device, "--dtype", args.dtype]
    directions_args, trajectories_args = sizes(args.smoke)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) if args.smoke else BENCH / "results"
        directions = bench_directions.benchmark(
            bench_directions.parse_args([*directions_args, *common])
        )
        trajectories = bench_trajectories.benchmark(
            bench_trajectories.parse_args([*trajectories_args, *common, "--layers", "0,11,21"])
        )
        where = directions["machine"].get("gpu", args.device)
        slug = re.sub(r"[^a-z0-9]+", "_", where.lower()).strip("_")
        paths = []
        for results in (directions, trajectories):
            path = out / f"{results['benchmark']}_{slug}_{args.dtype}.json"
            path.write_text(json.dumps(results, indent=2) + "\n")
            paths.append(path)
        body = f"### {where}\n\n" + render(paths)
        if args.smoke:
            print(body)
            return
    README.write_text(replace_between(README.read_text(), "gpu", body, str(README)))
    print(body)


if __name__ == "__main__":
    main()

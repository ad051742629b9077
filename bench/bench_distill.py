"""Benchmark the `trainable` distill student against the full-vocabulary table it replaced.

Data: a synthetic directions folder written through the project's layout
(`pipeline.concepts.layout`): `--vocab` tokens (Qwen3's 151,936 by default), `--concepts`
concepts of 1-4 tokens each (35/40/20/5%; mean 1.9, the order of a BPE tokenizer on
English words), drawn Zipf-like (p ~ 1/(rank+10)) over a seeded permutation of the
vocabulary, split 70/15/15; targets (D = `--dim`) a fixed random linear map of the mean
of a random table of the used tokens, so val cos_sim rises. The run's `embed_dim` and
`hidden_dim` and `distill.train` (batch size, lr, weight decay, seed) come from a params
file (`params.yaml`'s `trainable_e64_h256` by default).

Baseline: `FullTableMLP`, the trainable student before issue 14, verbatim: an
nn.Embedding of the whole vocabulary, so AdamW (fused, weight decay) steps every row.
Project: `pipeline.concepts.students.build_model`, whose embedding holds the rows of the
used tokens only. Both train with `pipeline.concepts.training.fit` (val scored after every
epoch), same seed, same batches, `--threads` torch threads, each in a fresh subprocess
(for its peak memory), `--repeats` times in alternating order. Seconds per epoch: the
median over epochs and repeats; peak memory: the subprocess's max RSS (torch included)
and the training state (weights, gradients, AdamW's two moments). The two runs' curves
are compared: the project must give the baseline's numbers.

    python bench/bench_distill.py --vocab 151936 --concepts 7000 --epochs 5 \
        --json bench/results/distill_trainable_qwen3_vocab.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from pipeline.common.params import load_params
from pipeline.common.shards import Manifest, shard_name
from pipeline.concepts.layout import KIND, DirectionSet, write_shard_rows, write_side_files
from pipeline.concepts.params import DistillParams
from pipeline.concepts.students import TOKENS, build_model, mean_pool, mlp
from pipeline.concepts.training import fit

ROOT = Path(__file__).resolve().parent.parent
LAYER = 1
SHARD_ROWS = 4096
LENGTHS = torch.tensor([0.35, 0.40, 0.20, 0.05])
"""P(a concept has 1, 2, 3, 4 tokens)."""
VARIANTS = ("full", "held")


class FullTableMLP(nn.Module):
    """The trainable student before issue 14, verbatim: a table of the whole vocabulary."""

    reads = TOKENS

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.head = mlp(embed_dim, hidden_dim, output_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.head(mean_pool(self.embedding(tokens), mask))  # (B, D)


def write_directions(folder: Path, vocab: int, concepts: int, dim: int) -> dict[str, int]:
    """The synthetic directions folder (see the module doc); returns its sizes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.multinomial(LENGTHS, concepts, replacement=True, generator=gen) + 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    weights = 1.0 / (torch.arange(vocab, dtype=torch.float64) + 10.0)
    ranks = torch.multinomial(weights, int(offsets[-1]), replacement=True, generator=gen)
    flat = torch.randperm(vocab, generator=gen)[ranks]
    used, local = torch.unique(flat, return_inverse=True)
    hidden = torch.randn(used.numel(), 32, generator=gen)
    mixing = torch.randn(32, dim, generator=gen)
    owner = torch.repeat_interleave(torch.arange(concepts), lengths)  # concept of each token
    pooled = torch.zeros(concepts, 32).index_add_(0, owner, hidden[local]) / lengths[:, None]
    activations = pooled @ mixing + 0.1 * torch.randn(concepts, dim, generator=gen)
    split = torch.multinomial(torch.tensor([0.70, 0.15, 0.15]), concepts, True, generator=gen)
    records = []
    for index, start in enumerate(range(0, concepts, SHARD_ROWS)):
        stop = min(start + SHARD_ROWS, concepts)
        records.append(
            write_shard_rows(
                folder / shard_name(index),
                torch.arange(start, stop),
                split[start:stop],
                {LAYER: activations[start:stop]},
            )
        )
    files = write_side_files(
        folder,
        means={LAYER: activations[split == 0].mean(0)},
        embedding_token_ids=used,
        embedding_rows=torch.zeros(used.numel(), 8),  # read by frozen students, not these
        offsets=offsets,
        flat_tokens=flat,
        texts=[f"c{i}" for i in range(concepts)],
    )
    extra = {"layers": [LAYER], "vocab_size": vocab, "hidden_size": dim, "embedding_dim": 8}
    extra |= {"model": "synthetic", "pooling": "last", "teacher_caveat": "", "revision": None}
    Manifest(kind=KIND, params={}, shards=records, files=files, extra=extra).save(folder)
    return {"tokens": int(offsets[-1]), "used_tokens": int(used.numel())}


def child(args: argparse.Namespace) -> None:
    """Train one variant on the folder; print its timings, curves and memory as JSON."""
    torch.set_num_threads(args.threads)
    distill = load_params(args.params, distill=DistillParams).distill
    spec, train = distill.runs[args.run], distill.train
    train = replace(train, layer=LAYER, epochs=args.epochs)
    data = DirectionSet(args.folder, LAYER)
    seed = train.seeds[0]
    torch.manual_seed(seed)
    start = time.perf_counter()
    if args.child == "full":
        model = FullTableMLP(data.vocab_size, spec.embed_dim, spec.hidden_dim, data.dim)
    else:
        table = (data.embedding_token_ids, data.embedding_rows)
        model = build_model(spec, data.vocab_size, data.dim, *table)
    build_s = time.perf_counter() - start
    stamps = [time.perf_counter()]
    result = fit(model, data, train, seed, on_epoch=lambda _: stamps.append(time.perf_counter()))
    values = sum(p.numel() for p in model.parameters())
    print(
        json.dumps(
            {
                "variant": args.child,
                "build_s": build_s,
                "epoch_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
                "curves": result.curves,
                "values": values,
                # weights, gradients, AdamW exp_avg and exp_avg_sq, float32
                "training_state_bytes": 4 * 4 * values,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_child(args: argparse.Namespace, folder: Path, variant: str) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--folder", str(folder)]
    command += ["--params", str(args.params), "--run", args.run, "--epochs", str(args.epochs)]
    command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--concepts", type=int, default=7000)
    parser.add_argument("--dim", type=int, default=1024, help="direction width D")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--run", default="trainable_e64_h256", help="a trainable distill run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of both runs (on cores other jobs share, 2 threads spin-wait)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "directions"
        sizes = write_directions(folder, args.vocab, args.concepts, args.dim)
        order = [VARIANTS if r % 2 == 0 else VARIANTS[::-1] for r in range(args.repeats)]
        runs = [run_child(args, folder, variant) for pair in order for variant in pair]
    by = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    per_epoch = {v: statistics.median(s for r in by[v] for s in r["epoch_s"]) for v in VARIANTS}
    curve_diff = max(
        abs(a[key] - b[key])
        for full, held in zip(by["full"], by["held"], strict=True)
        for a, b in zip(full["curves"], held["curves"], strict=True)
        for key in ("train_loss", "train_cos", "val_cos")
    )
    spec = load_params(args.params, distill=DistillParams).distill.runs[args.run]
    results = {
        "vocab": args.vocab,
        "concepts": args.concepts,
        "dim": args.dim,
        **sizes,
        "run": args.run,
        "embed_dim": spec.embed_dim,
        "hidden_dim": spec.hidden_dim,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "threads": runs[0]["threads"],
        **{f"{v}_s_per_epoch": per_epoch[v] for v in VARIANTS},
        "speedup": per_epoch["full"] / per_epoch["held"],
        **{f"{v}_build_s": statistics.median(r["build_s"] for r in by[v]) for v in VARIANTS},
        **{f"{v}_values": by[v][0]["values"] for v in VARIANTS},
        **{f"{v}_training_state_bytes": by[v][0]["training_state_bytes"] for v in VARIANTS},
        **{f"{v}_peak_rss_bytes": max(r["peak_rss_bytes"] for r in by[v]) for v in VARIANTS},
        "max_curve_difference": curve_diff,
        "final_val_cos": by["held"][0]["curves"][-1]["val_cos"],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The guided LM's report: per (size, lambda) means over seeds with t-intervals, the
paired difference to lambda = 0 at equal tokens, the table, the summary entries, the
data-efficiency PNG and the TSV that dvc.yaml's top-level `plots:` charts.

    cells = [{"fraction": 0.5, "train_tokens": 4672, "lambda": 0.1, "seed": 0,
              "heldout_loss": 6.9, "aux_cos_train": 0.4, ...}, ...]
    rows = aggregate(cells)       # one row per (size, lambda), ascending
    guided_table(metrics), summary(metrics)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.common.intervals import t_interval
from pipeline.common.io import write_text
from pipeline.common.pictures import Panel, line_panels
from pipeline.common.tables import counted, fmt, markdown_table, over_rows, spec, with_interval

BRANCH = "guided LM"
INTERVAL_KIND = "t 95% over seeds"
SCORES = ("aux_cos_train", "aux_cos_test", "probe_cos_train", "probe_cos_test")
"""Per cell, held-out occurrences: the learned aux map's cos (lambda > 0) and a
least-squares probe's cos on the frozen hidden states (every lambda), for train-split
and test-split concepts."""
BUILTIN_CAVEAT = (
    "builtin corpus: words drawn independently by frequency, so no context says what a "
    "word means; these numbers test the code, not the method"
)
QUESTION = (
    "seed 000, open question 3: can direction supervision reduce the data a tiny LM needs? "
    "(question 5, the minimum LM size, is the same grid swept over guided_lm.d_model / "
    "num_layers as DVC experiments)"
)


def _mean(values: Sequence[float | None]) -> float | None:
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def _interval(values: Sequence[float | None]) -> list[float] | None:
    if any(v is None for v in values):
        return None
    interval = t_interval(values)
    return list(interval) if interval is not None else None


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (fraction, lambda): means over seeds, t-intervals, and the paired
    difference (this lambda minus lambda = 0, same seed and size) with its interval."""
    keyed = {(c["fraction"], c["lambda"], c["seed"]): c for c in cells}
    rows = []
    for fraction, lam in sorted({(c["fraction"], c["lambda"]) for c in cells}):
        group = [c for c in cells if (c["fraction"], c["lambda"]) == (fraction, lam)]
        group.sort(key=lambda c: c["seed"])
        losses = [c["heldout_loss"] for c in group]
        diffs = [
            c["heldout_loss"] - keyed[(fraction, 0.0, c["seed"])]["heldout_loss"] for c in group
        ]
        row = {
            "fraction": fraction,
            "lambda": lam,
            "train_tokens": group[0]["train_tokens"],
            "n": len(group),
            "heldout_loss": _mean(losses),
            "heldout_loss_interval": _interval(losses),
            "difference": _mean(diffs) if lam > 0 else None,
            "difference_interval": _interval(diffs) if lam > 0 else None,
        }
        for score in SCORES:
            row[score] = _mean([c[score] for c in group])
            row[f"{score}_interval"] = _interval([c[score] for c in group])
        rows.append(row)
    return rows


def _row(rows: list[dict[str, Any]], fraction: float, lam: float) -> dict[str, Any]:
    return next(r for r in rows if r["fraction"] == fraction and r["lambda"] == lam)


def title(metrics: dict[str, Any]) -> str:
    teacher = metrics["teacher"]
    text = (
        f"# Direction-supervised tiny LM: held-out LM loss vs train tokens, lambda > 0 against "
        f"lambda = 0 at equal tokens (directions: {teacher['model']} layer {teacher['layer']})"
    )
    caveat = metrics["caveat"]
    return text + (f" ({caveat})" if caveat else "")


LOSS, DIFFERENCE = spec(".4f"), spec("+.4f")
"""The table's precision: nats/token and cos to 4 decimals, a difference signed."""


def guided_table(metrics: dict[str, Any], min_rows: int) -> str:
    """The table: per size and lambda, the held-out loss, its difference to lambda = 0 and
    the aux / probe cos on held-out occurrences of train- and test-split concepts, each
    column naming its rows; a cos over fewer than `min_rows` occurrences
    (`guided_lm.min_rows`) reads `n=<occurrences> < min_rows`."""
    counts = metrics["counts"]
    on = {split: counts[f"heldout_{split}_occurrences"] for split in ("train", "test")}
    lines = [
        title(metrics),
        "",
        f"Answers {QUESTION}. A {counts['parameters']:,}-parameter LlamaForCausalLM "
        f"(random init; its vocabulary the {counts['vocabulary']:,} token ids the chunks use, "
        f"of the tokenizer's {counts['tokenizer_vocabulary']:,}) per cell trains "
        f"{counts['steps']} steps of {counts['batch_size']} chunks "
        f"on a prefix of the train blocks (a smaller corpus is seen more often); the loss is "
        f"nats/token on the {counts['heldout_chunks']} held-out chunks "
        f"({counts['heldout_tokens']:,} tokens), the same for every cell; mean over "
        f"{counts['seeds']} seeds [{INTERVAL_KIND}]. Difference: this lambda minus lambda = 0, "
        "same seed and size, its interval over seeds. Only train-split concepts supervise "
        f"({counts['supervising_occurrences']:,} occurrences in the train blocks); cos: on "
        f"held-out occurrences of train-split ({counts['heldout_train_occurrences']:,}) / "
        f"test-split ({counts['heldout_test_occurrences']:,}) concepts, of the learned aux map "
        "(lambda > 0) and of a least-squares probe fitted on the frozen hidden states of the "
        "train occurrences (every lambda: the probe on lambda = 0 is the control for "
        "'the supervision takes'); a cos over fewer than "
        f"{min_rows} occurrences (guided_lm.min_rows) reads `n=<occurrences> < {min_rows}`.",
        "",
    ]
    header = [
        "train tokens",
        "lambda",
        counted("held-out loss [interval]", counts["heldout_chunks"]),
        "difference vs lambda=0 [interval]",
        *(
            f"{kind} cos {counted('train', on['train'])} / {counted('test', on['test'])}"
            for kind in ("aux", "probe")
        ),
    ]

    def cos(row: dict[str, Any], kind: str) -> str:
        return " / ".join(
            over_rows(row[f"{kind}_cos_{split}"], on[split], min_rows, LOSS)
            for split in ("train", "test")
        )

    body = [
        [
            f"{row['train_tokens']:,}",
            fmt(row["lambda"]),
            with_interval(row["heldout_loss"], row["heldout_loss_interval"], LOSS),
            with_interval(row["difference"], row["difference_interval"], DIFFERENCE),
            cos(row, "aux"),
            cos(row, "probe"),
        ]
        for row in metrics["rows"]
    ]
    lines += markdown_table(header, body, align="rrllll")
    return "\n".join(lines) + "\n"


def summary(metrics: dict[str, Any], min_rows: int) -> list[dict[str, Any]]:
    """Held-out loss of the largest lambda at the largest and the smallest size, each next
    to lambda = 0 at equal tokens (downstream: the paired difference); and the aux map's
    held-out cos next to the probe on the lambda = 0 model, with the occurrences it rests
    on (`rows`) and `min_rows`."""
    rows, lam = metrics["rows"], max(metrics["lambdas"])
    sizes = sorted({r["fraction"] for r in rows})
    caveat = metrics["caveat"] or None
    teacher = metrics["teacher"]["model"]
    entries = []
    for fraction in dict.fromkeys([sizes[-1], sizes[0]]):
        guided, control = _row(rows, fraction, lam), _row(rows, fraction, 0.0)
        entries.append(
            {
                "branch": BRANCH,
                "metric": f"held-out LM loss, lambda={fmt(lam)}, "
                f"{guided['train_tokens']:,} train tokens (nats/token)",
                "value": guided["heldout_loss"],
                "interval": guided["heldout_loss_interval"],
                "interval_kind": INTERVAL_KIND,
                "control": "lambda = 0 (plain LM) at equal tokens",
                "control_value": control["heldout_loss"],
                "control_interval": control["heldout_loss_interval"],
                "downstream": "paired difference lambda - 0 (nats/token)",
                "downstream_value": guided["difference"],
                "teacher": teacher,
                "n": guided["n"],
                "caveat": caveat,
            }
        )
    largest = _row(rows, sizes[-1], lam)
    control = _row(rows, sizes[-1], 0.0)
    if largest["aux_cos_train"] is not None:
        entries.append(
            {
                "branch": BRANCH,
                "metric": f"aux map cos on held-out train-concept occurrences, lambda={fmt(lam)}",
                "value": largest["aux_cos_train"],
                "interval": largest["aux_cos_train_interval"],
                "interval_kind": INTERVAL_KIND,
                "control": "least-squares probe on the lambda = 0 model's hidden states",
                "control_value": control["probe_cos_train"],
                "control_interval": control["probe_cos_train_interval"],
                "downstream": None,
                "downstream_value": None,
                "teacher": teacher,
                "n": largest["n"],
                "rows": metrics["counts"]["heldout_train_occurrences"],
                "min_rows": min_rows,
                "caveat": caveat,
            }
        )
    return entries


def column(lam: float) -> str:
    """The TSV column of one lambda (no dot: vega reads a dot as a nested field)."""
    return "lambda_" + fmt(lam).replace(".", "p").replace("-", "m")


def write_curve(path: Path, metrics: dict[str, Any]) -> None:
    """TSV for `dvc plots`: train_tokens, then the held-out loss of each lambda."""
    rows, lambdas = metrics["rows"], sorted(metrics["lambdas"])
    lines = ["\t".join(["train_tokens", *(column(lam) for lam in lambdas)])]
    for fraction in sorted({r["fraction"] for r in rows}):
        cells = [_row(rows, fraction, lam) for lam in lambdas]
        values = [repr(float(c["heldout_loss"])) for c in cells]
        lines.append("\t".join([str(cells[0]["train_tokens"]), *values]))
    write_text(path, "\n".join(lines) + "\n")


def plot(path: Path, metrics: dict[str, Any]) -> None:
    """Held-out loss vs train tokens, one line per lambda, and lower/upper interval lines."""
    rows, lambdas = metrics["rows"], sorted(metrics["lambdas"])
    series: dict[str, tuple[list[float], list[float]]] = {}
    for lam in lambdas:
        mine = sorted((r for r in rows if r["lambda"] == lam), key=lambda r: r["fraction"])
        x = [float(r["train_tokens"]) for r in mine]
        series[f"lambda={fmt(lam)}"] = (x, [r["heldout_loss"] for r in mine])
        if all(r["heldout_loss_interval"] for r in mine):
            for side, label in ((0, "low"), (1, "high")):
                y = [r["heldout_loss_interval"][side] for r in mine]
                series[f"lambda={fmt(lam)} 95% {label}"] = (x, y)
    teacher, caveat = metrics["teacher"], metrics["caveat"]
    heading = (
        f"Direction-supervised tiny LM (directions: {teacher['model']} layer {teacher['layer']})"
        + (f"\n{caveat}" if caveat else "")
    )
    panel = Panel("held-out LM loss vs train tokens", "train tokens", "nats/token", series)
    line_panels(path, heading, [panel], columns=1)

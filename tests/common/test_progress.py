"""Progress bars: redrawn in place on a terminal, periodic plain lines elsewhere."""

from __future__ import annotations

import io

from pipeline.common.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_redrawn_in_place():
    stream = Terminal()
    for _ in progress(range(3), file=stream, desc="sae", unit="epoch"):
        pass
    text = stream.getvalue()
    assert text.count("\r") >= 2 and "3/3" in text and "|" in text  # the drawn bar


def test_a_log_gets_lines_no_redraws_at_most_one_per_interval():
    stream = io.StringIO()
    bar = progress(range(1000), file=stream, desc="sidecar", unit="step", leave=False)
    for step in bar:
        bar.set_postfix(loss=f"{step / 1000:.3f}")  # does not force a line
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    # The opening line and the closing one: a 30 s interval is not reached in this loop.
    assert lines[0].startswith("sidecar: 0/1000 [")
    assert lines[-1].startswith("sidecar: 1000/1000 [") and lines[-1].endswith("loss=0.999]")
    assert len(lines) == 2


def test_a_log_gets_a_line_per_update_when_the_interval_is_zero():
    stream = io.StringIO()
    with progress(total=3, file=stream, desc="directions", unit="row", interval=0) as bar:
        for _ in range(3):
            bar.update(1)
    counts = [line.split(" [")[0] for line in stream.getvalue().splitlines()]
    assert counts[:4] == [
        "directions: 0/3",
        "directions: 1/3",
        "directions: 2/3",
        "directions: 3/3",
    ]


def test_a_bar_nested_in_another_leaves_no_cursor_moves_in_a_log():
    stream = io.StringIO()
    for _ in progress(range(2), file=stream, desc="cells", unit="cell"):
        for _ in progress(range(2), file=stream, desc="cell", unit="step", leave=False):
            pass
    assert "\x1b" not in stream.getvalue()
    lines = stream.getvalue().splitlines()
    assert all(line.split(":")[0] in ("cells", "cell") for line in lines)

"""Stage `report`: tables and pictures on one self-contained HTML page, the same bytes from
the same inputs, one error line naming a bad input; and the page as headless Chromium
draws it, with no network."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import run as cli
from pipeline.common.report_page import run

SUMMARY = """# Summary: headlines

Values are on held-out data.

| branch | metric | value |
|---|---|---:|
| sidecar | LM loss increase | 0.1234 |
| sae | loss recovered | 0.9876 |

(1) first note
(2) second note
"""
COMPARISON = """# Concept directions

| Approach | Test cos_sim |
|---|---|
| Linear Probe | 0.6765 |
| Baseline: quoted <\\|endoftext\\|> & more | 0.5000 |
"""
BLUE = (31, 119, 180)


def png(path: Path, size=(240, 120), color=BLUE) -> Path:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "summary.md").write_text(SUMMARY)
    (tmp_path / "comparison.md").write_text(COMPARISON)
    return {
        "tables": [tmp_path / "summary.md", tmp_path / "comparison.md"],
        "images": [png(tmp_path / "curves.png")],
    }


def test_tables_become_html_tables_in_option_order(inputs, tmp_path):
    stats = run(tmp_path / "report.html", **inputs)
    page = (tmp_path / "report.html").read_text()
    assert stats == {"tables": 2, "images": 1, "bytes": len(page.encode())}
    # Two Markdown tables, plus the Sources table in the footer.
    assert page.count("<table>") == 3
    row = '<td>sidecar</td>\n<td>LM loss increase</td>\n<td style="text-align:right">0.1234</td>'
    assert row in page
    assert '<td style="text-align:right">0.9876</td>' in page
    # Headings move one level down, under the page's own h1; line breaks are kept.
    assert "<h2>Summary: headlines</h2>" in page and page.count("<h1>") == 1
    assert "(1) first note<br />\n(2) second note" in page
    # Quoted tokens stay text, never markup.
    assert "quoted &lt;|endoftext|&gt; &amp; more" in page and "<|endoftext|>" not in page
    # The order of the options is the order on the page, in the contents too.
    where = [page.index(s) for s in ("Summary: headlines</h2>", "Concept directions</h2>")]
    assert where == sorted(where) and where[-1] < page.index("<figure")
    contents = re.findall(r'<li><a href="#([^"]+)">', page)
    assert len(contents) == 3 and contents[0].endswith("summary-md")
    assert all(f'id="{ident}"' in page for ident in contents)


def test_the_picture_is_embedded_as_a_data_uri_of_its_exact_bytes(inputs, tmp_path):
    run(tmp_path / "report.html", **inputs)
    page = (tmp_path / "report.html").read_text()
    (uri,) = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(uri) == inputs["images"][0].read_bytes()
    assert 'width="240" height="120"' in page


def test_the_page_references_nothing_outside_itself(inputs, tmp_path):
    run(tmp_path / "report.html", **inputs)
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"https?://", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert all(src.startswith("data:") for src in re.findall(r'src="([^"]*)"', page))
    assert all(href.startswith("#") for href in re.findall(r'href="([^"]*)"', page))


def test_image_syntax_in_a_table_loads_nothing(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| ![x](https://example.org/x.png) |\n")
    run(tmp_path / "report.html", [tmp_path / "t.md"])
    page = (tmp_path / "report.html").read_text()
    assert "<img" not in page  # stays a link: a click, never a fetch
    assert '<a href="https://example.org/x.png">x</a>' in page


def test_the_same_inputs_give_the_same_bytes_and_the_header_names_them(inputs, tmp_path):
    run(tmp_path / "a.html", **inputs)
    run(tmp_path / "b.html", **inputs)
    first = (tmp_path / "a.html").read_bytes()
    assert first == (tmp_path / "b.html").read_bytes()
    hashes = [
        hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs["tables"] + inputs["images"]
    ]
    assert all(f"<code>{digest}</code>" in first.decode() for digest in hashes)
    paths = inputs["tables"] + inputs["images"]
    lines = "".join(f"{path}\t{digest}\n" for path, digest in zip(paths, hashes, strict=True))
    together = hashlib.sha256(lines.encode()).hexdigest()
    assert "from the 3 files listed" in first.decode()
    assert f"(together: sha256 <code>{together}</code>)" in first.decode()
    # A changed input (same length) changes the page, its row and the digest over all.
    inputs["tables"][0].write_text(SUMMARY.replace("0.1234", "0.4321"))
    run(tmp_path / "c.html", **inputs)
    changed = (tmp_path / "c.html").read_text()
    assert "0.4321" in changed and hashes[0] not in changed and together not in changed
    assert hashes[1] in changed and hashes[2] in changed


@pytest.mark.parametrize(
    ("where", "content", "message"),
    [
        ("tables", None, "missing.md: no such table; run the stage that writes it"),
        ("images", None, "missing.png: no such picture; run the stage that writes it"),
        ("tables", b"| a |\n|---|\n| \xff |\n", "bad.md: not UTF-8 text (byte 14"),
        ("images", b"| a table |\n", "bad.png: not a PNG, JPEG, GIF picture"),
        ("images", "truncated", "bad.png: not a readable picture"),
    ],
)
def test_a_bad_input_is_one_error_line_naming_it(inputs, tmp_path, capsys, where, content, message):
    name = ("missing" if content is None else "bad") + {"tables": ".md", "images": ".png"}[where]
    path = tmp_path / name
    if content == "truncated":
        path.write_bytes(inputs["images"][0].read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    inputs[where].append(path)
    argv = ["report", "--out", str(tmp_path / "report.html")]
    argv += [arg for t in inputs["tables"] for arg in ("--table", str(t))]
    argv += [arg for i in inputs["images"] for arg in ("--image", str(i))]
    with pytest.raises(SystemExit) as exit_info:
        cli(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert str(path) in err
    assert not (tmp_path / "report.html").exists()


def test_nothing_to_show_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="at least one --table or --image"):
        run(tmp_path / "report.html", [], [])


# The browser: Debian's chromium, headless, with every host name unresolvable, so a page
# that needed the network would show it.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WINDOW = (1000, 1400)
# Run after `load` (which waits for every image): what the browser made of the page.
PROBE = """<script>
window.addEventListener("load", () => {
  const rect = (e) => { const r = e.getBoundingClientRect();
    return [r.left, r.top, r.right, r.bottom].map(Math.round); };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({
    tables: [...document.querySelectorAll("main table")].map(rect),
    images: [...document.images].map((i) => [i.complete, i.naturalWidth, i.naturalHeight]),
    imageRects: [...document.images].map(rect),
    fetched: performance.getEntriesByType("resource").map((e) => e.name),
  });
  document.body.append(out);
});
</script>
"""


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    width, height = WINDOW
    done = subprocess.run(
        [
            CHROMIUM,
            *("--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"),
            *("--no-first-run", "--force-device-scale-factor=1"),
            "--host-resolver-rules=MAP * ~NOTFOUND",
            f"--user-data-dir={tmp_path / 'chromium-profile'}",
            f"--window-size={width},{height}",
            *args,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def probe(tmp_path: Path, page: Path) -> dict:
    """The probe's findings on a copy of `page` with PROBE added (the page has no script)."""
    copy = tmp_path / f"probed-{page.name}"
    copy.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium(tmp_path, copy, "--dump-dom").stdout
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(found.group(1))


def region(shot: np.ndarray, box) -> np.ndarray:
    left, top, right, bottom = box
    return shot[top:bottom, left:right]


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)",
)
def test_chromium_draws_the_tables_and_the_picture_offline(inputs, tmp_path):
    run(tmp_path / "report.html", **inputs)
    found = probe(tmp_path, tmp_path / "report.html")
    assert found["fetched"] == [], "the page fetched something"
    assert found["images"] == [[True, 240, 120]], "the picture did not decode"
    assert len(found["tables"]) == 2
    chromium(tmp_path, tmp_path / "report.html", f"--screenshot={tmp_path / 'shot.png'}")
    with Image.open(tmp_path / "shot.png") as image:
        assert image.size == WINDOW
        shot = np.asarray(image.convert("RGB")).astype(int)  # (H, W, 3)
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 20, "a blank screenshot"
    width, height = WINDOW
    for box in found["tables"] + found["imageRects"]:
        left, top, right, bottom = box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, box
    # Table text is dark on white; the picture is where the probe says, in its colour.
    for box in found["tables"]:
        assert (region(shot, box).max(axis=-1) < 96).mean() > 0.01, box
    (image_box,) = found["imageRects"]
    picture = region(shot, image_box)
    assert (np.abs(picture - BLUE).max(axis=-1) <= 8).mean() > 0.9
    # Beside it the page is white: the blue is the picture's, not the page's.
    left, top, right, bottom = image_box
    assert (region(shot, (right + 20, top, min(right + 220, width), bottom)) == 255).all()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH")
def test_the_probe_sees_a_page_that_needs_the_network(tmp_path):
    page = tmp_path / "remote.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="https://example.org/x.png"></body></html>'
    )
    found = probe(tmp_path, page)
    assert found["fetched"] == ["https://example.org/x.png"]
    assert found["images"] == [[True, 0, 0]]  # failed: complete, but nothing decoded

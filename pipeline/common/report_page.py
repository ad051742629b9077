"""Stage `report`: every branch's tables and pictures on one HTML page that opens offline.

Reads the Markdown tables the stages write and their PNG pictures; writes one
self-contained HTML file: the tables rendered by markdown-it-py (CommonMark plus its
GFM-style tables), each picture embedded as a base64 `data:` URI, one inline stylesheet,
no script and no external reference, so the page shows the same from disk, mailed, or
on a machine without network. The order of the options is the order on the page.

The page names what produced it: every input by sha256, and one sha256 over them all,
and nothing else (no date, no host, no params file: an edit of params.yaml that changes
no result re-runs no stage but params_check), so the same inputs give the same bytes.

    python -m pipeline.cli report --out metrics/report.html \
        --table metrics/summary.md --table metrics/comparison.md ... \
        --image metrics/plots/distill_val_curves.png ...
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from markdown_it import MarkdownIt
from PIL import Image, UnidentifiedImageError

from pipeline.common.io import write_text

TITLE = "Activation distillation: results"
# What a browser shows from a data: URI; PIL's format name -> MIME type.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 90rem;
  padding: 0 1rem; color: #111; background: #fff; line-height: 1.4; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1.5rem; }
section { margin: 2rem 0; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.75rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #bbb; padding: 0.25rem 0.5rem; vertical-align: top; }
th { background: #eee; }
tbody tr:nth-child(even) { background: #f7f7f7; }
code { font-size: 0.9em; }
.source { color: #555; font-size: 0.85rem; margin: 0; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.85rem; }
"""


def markdown() -> MarkdownIt:
    """CommonMark with tables; each line break kept, as the stages write their notes one
    per line. Raw HTML is escaped (tables quote text such as `<|endoftext|>`) and image
    syntax stays text, so a table cannot make the page load anything."""
    options = {"html": False, "breaks": True}
    return MarkdownIt("commonmark", options).enable("table").disable("image")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_input(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no such {what}; run the stage that writes it (dvc.yaml names it)"
        ) from None
    except OSError as err:
        raise OSError(f"{path}: cannot read the {what}: {err.strerror or err}") from None


def anchor(path: Path, taken: set[str]) -> str:
    """A unique HTML id for an input: its path in lowercase words."""
    base = re.sub(r"[^a-z0-9]+", "-", str(path).lower()).strip("-") or "input"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def table_section(path: Path, data: bytes, md: MarkdownIt, ident: str) -> tuple[str, str]:
    """(title, HTML section) of one Markdown file; its headings one level down, under
    the page's own h1."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    tokens = md.parse(text)
    title = str(path)
    for i, token in enumerate(tokens):
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 1, 6)}"
        if token.type == "heading_open" and title == str(path):
            title = tokens[i + 1].content
    body = md.renderer.render(tokens, md.options, {})
    source = f'<p class="source">from <code>{html.escape(str(path))}</code></p>'
    return title, f'<section id="{ident}">\n{source}\n{body}</section>'


def image_figure(path: Path, data: bytes, ident: str) -> tuple[str, str]:
    """(title, HTML figure) of one picture, embedded as a data: URI."""
    expected = f"a {', '.join(IMAGE_FORMATS)} picture"
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
            image.verify()  # a truncated or corrupt file fails here, not in the browser
            kind, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not {expected}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{path}: not a readable picture ({err})") from None
    uri = f"data:{IMAGE_FORMATS[kind]};base64,{base64.b64encode(data).decode('ascii')}"
    name = html.escape(str(path))
    figure = (
        f'<figure id="{ident}">\n<img src="{uri}" alt="{html.escape(Path(path).stem)}" '
        f'width="{width}" height="{height}">\n<figcaption><code>{name}</code> '
        f"({width} x {height})</figcaption>\n</figure>"
    )
    return str(path), figure


def page(tables: Sequence[Path], images: Sequence[Path]) -> tuple[str, dict[str, Any]]:
    """The HTML page and its stats; reads every input, writes nothing."""
    if not tables and not images:
        raise ValueError("report: name at least one --table or --image")
    md, taken = markdown(), set()
    contents, sections, sources = [], [], []
    inputs = [(path, "table") for path in tables] + [(path, "picture") for path in images]
    for path, what in inputs:
        data = read_input(path, what)
        ident = anchor(Path(path), taken)
        if what == "table":
            title, section = table_section(Path(path), data, md, ident)
        else:
            title, section = image_figure(Path(path), data, ident)
        contents.append(f'<li><a href="#{ident}">{html.escape(title)}</a></li>')
        sections.append(section)
        sources.append((path, what, data))
    # One digest for the whole set: each input's path and sha256, in page order.
    digest = sha256("".join(f"{path}\t{sha256(data)}\n" for path, _, data in sources).encode())
    produced = (
        f"Produced by <code>python -m pipeline.cli report</code> from the {len(sources)} "
        f'files listed with their sha256 under <a href="#sources">Sources</a> '
        f"(together: sha256 <code>{digest}</code>)."
    )
    rows = "\n".join(
        f"<tr><td><code>{html.escape(str(path))}</code></td><td>{what}</td>"
        f'<td style="text-align:right">{len(data)}</td><td><code>{sha256(data)}</code></td></tr>'
        for path, what, data in sources
    )
    text = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en">',
            "<head>",
            '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{TITLE}</title>",
            f"<style>{STYLE}</style>",
            "</head>",
            "<body>",
            "<header>",
            f"<h1>{TITLE}</h1>",
            f"<p>{produced}</p>",
            "<nav><ol>",
            *contents,
            "</ol></nav>",
            "</header>",
            "<main>",
            *sections,
            "</main>",
            '<footer id="sources">',
            "<h2>Sources</h2>",
            "<table>",
            "<thead><tr><th>file</th><th>kind</th><th>bytes</th><th>sha256</th></tr></thead>",
            f"<tbody>\n{rows}\n</tbody>",
            "</table>",
            "</footer>",
            "</body>",
            "</html>",
            "",
        ]
    )
    return text, {"tables": len(tables), "images": len(images), "bytes": len(text.encode())}


def run(out: Path, tables: Sequence[Path], images: Sequence[Path] = ()) -> dict[str, Any]:
    """Write the page to `out`; return its stats (tables, images, bytes)."""
    text, stats = page(tables, images)
    write_text(Path(out), text)
    return stats


def command(
    out: Annotated[Path, typer.Option(help="The HTML page to write.")],
    table: Annotated[
        list[Path] | None, typer.Option(help="A Markdown table file; repeat, in page order.")
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="A PNG picture; repeat, in page order.")
    ] = None,
) -> None:
    """Put every table and picture on one self-contained HTML page that opens offline."""
    stats = run(out, table or [], image or [])
    typer.echo(
        f"report: {stats['tables']} tables and {stats['images']} pictures "
        f"({stats['bytes']} bytes) -> {out}"
    )

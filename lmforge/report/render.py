"""A report as plain blocks (paragraphs, tables, code, figures), written as Markdown or as one
self-contained HTML page.

The HTML page makes no request: CSS is inline, images are ``data:image/png;base64,`` URIs, and
its Content-Security-Policy allows nothing else (no network, only the page's own script, by
hash). All text is escaped. The one script counts the images that decoded into
``<body data-images-loaded>``, so a headless browser's DOM dump shows that they rendered.
"""

from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass, field


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Code:
    """Preformatted text: a sample, a pattern, a JSON record."""

    text: str


@dataclass
class Figure:
    caption: str
    png: bytes
    link: str | None = None  # where Markdown finds the image (a path relative to it); None: only
    # the HTML page shows it


Block = str | Table | Code | Figure  # a str is a paragraph


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


# --- Markdown -----------------------------------------------------------------------------------

def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_block(block: Block) -> str:
    if isinstance(block, Table):
        lines = [f"{block.caption}:\n"] if block.caption else []
        lines += ["| " + " | ".join(map(_md_cell, block.header)) + " |",
                 "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Code):
        fence = "```"
        while fence in block.text:  # a fence longer than any run of backticks in the text
            fence += "`"
        return f"{fence}text\n{block.text}\n{fence}"
    if isinstance(block, Figure):
        if block.link is None:
            return f"*{block.caption}: shown in report.html*"
        return f"![{block.caption}]({block.link})"
    return block


def to_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [_md_block(b) for b in section.blocks]
    return "\n\n".join(parts) + "\n"


# --- HTML ---------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1d1d1f; background: #fff; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .6em 1.2em .6em 0; display: inline-table;
        vertical-align: top; }
caption { text-align: left; font-weight: 600; padding-bottom: .2em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
pre { background: #f6f6f6; border: 1px solid #ddd; padding: .6em; overflow-x: auto;
      white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 90%; }
nav a { margin-right: .8em; }
"""

# Counts the images that decoded (naturalWidth > 0); reads the page, changes nothing else.
SCRIPT = ("window.addEventListener('load', function () {"
          " var n = 0; var images = document.images;"
          " for (var i = 0; i < images.length; i++) { if (images[i].naturalWidth > 0) n++; }"
          " document.body.dataset.imagesLoaded = String(n); });")


def _csp() -> str:
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src 'sha256-{digest}'")


def _anchor(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower())


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in block.header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                       for row in block.rows)
        caption = f"<caption>{e(block.caption)}</caption>" if block.caption else ""
        return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Code):
        return f"<pre>{e(block.text)}</pre>"
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        return (f'<figure><img alt="{e(block.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>")
    return f"<p>{e(block)}</p>"


def to_html(title: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{_anchor(s.title)}">{html.escape(s.title)}</a>' for s in sections)
    body = []
    for s in sections:
        body.append(f'<section id="{_anchor(s.title)}"><h2>{html.escape(s.title)}</h2>')
        body += [_html_block(b) for b in s.blocks]
        body.append("</section>")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_csp()}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style>",
        f"<script>{SCRIPT}</script>", "</head><body>",
        f"<h1>{html.escape(title)}</h1>", f"<nav>{nav}</nav>", *body, "</body></html>", ""])

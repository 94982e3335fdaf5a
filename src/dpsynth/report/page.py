"""HTML building blocks of the report: one self-contained page (styles inline,
images as base64 `data:` URIs, no script, nothing fetched), with alt text on
every image and every number also in text.

>>> table(["name", "value"], [["<b>", 1]], numeric=(1,)).count('<td class="num">1</td>')
1
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

CSS = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5b6472; --line: #d9dee6;
        --accent: #1f5fa8; --warn: #8a1c1c; --warn-bg: #fdecec; --soft: #f4f6f9; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, Arial,
       sans-serif; color: var(--ink); background: #fff; }
main { max-width: 62rem; margin: 0 auto; padding: 1.5rem 1.25rem 3rem; }
h1 { font-size: 1.9rem; line-height: 1.2; margin: .5rem 0 .75rem; }
h2 { font-size: 1.35rem; margin: 2.5rem 0 .75rem; padding-top: .75rem;
     border-top: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.5rem 0 .5rem; }
p, li { max-width: 48rem; }
.lede { font-size: 1.1rem; }
.muted, figcaption, .note { color: var(--muted); font-size: .92rem; }
.warning { border: 2px solid var(--warn); background: var(--warn-bg); color: var(--warn);
           padding: .75rem 1rem; border-radius: 6px; font-weight: 600; }
.not-run { background: var(--soft); padding: .75rem 1rem; border-radius: 6px; }
.label { display: inline-block; font-size: .78rem; font-weight: 600; padding: 0 .4rem;
         border-radius: 4px; border: 1px solid currentColor; vertical-align: middle; }
.label.dp { color: #1b6b3a; } .label.real { color: #8a5a00; } .label.nodp { color: var(--warn); }
nav ol { columns: 2; padding-left: 1.25rem; margin: .25rem 0; }
nav a { color: var(--accent); }
.glance { display: grid; grid-template-columns: repeat(auto-fit, minmax(9rem, 1fr));
          gap: .75rem; margin: 1rem 0; padding: 0; }
.glance div { background: var(--soft); border-radius: 6px; padding: .6rem .8rem; margin: 0; }
.glance dt { font-size: .85rem; color: var(--muted); }
.glance dd { margin: .1rem 0 0; font-size: 1.25rem; font-weight: 600; }
.glance dd small { display: block; font-size: .8rem; font-weight: 400; color: var(--muted); }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .93rem; }
caption { text-align: left; color: var(--muted); font-size: .9rem; padding-bottom: .25rem; }
th, td { border-bottom: 1px solid var(--line); padding: .35rem .7rem .35rem 0;
         text-align: left; vertical-align: top; }
thead th { border-bottom: 2px solid var(--line); }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
figure { margin: 1rem 0 1.5rem; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
.nowrap { white-space: nowrap; }
.pixels { image-rendering: pixelated; image-rendering: crisp-edges; }
table.pairs td { padding: .25rem .6rem .25rem 0; }
table.pairs img { margin: 0 2px 0 0; border: 1px solid var(--line); vertical-align: middle; }
.figures { display: grid; grid-template-columns: repeat(auto-fit, minmax(20rem, 1fr));
           gap: 0 1.5rem; }
code, pre { font: .85rem/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code.hash { word-break: break-all; }
pre { background: var(--soft); padding: .75rem 1rem; overflow-x: auto; border-radius: 6px; }
details summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; }
@media print { h2 { break-after: avoid; } figure, table { break-inside: avoid; } }
"""


def esc(text: object) -> str:
    """`text` as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(text), quote=True)


def prose(text: object) -> str:
    """`text` as HTML for running text: escaped, and numbers such as 1e-5 kept on one
    line (a browser would break them at the minus sign)."""
    return re.sub(r"\d(?:\.\d+)?e-\d+", lambda m: f'<span class="nowrap">{m[0]}</span>',
                  esc(text))


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of one uint8 image, (H, W, 1) or (H, W, 3), at its native size."""
    array = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, *, size: tuple[int, int] | None = None,
        pixels: bool = False) -> str:
    """An `<img>` with the PNG embedded, shown at `size` (width, height) CSS pixels if
    given; `pixels` keeps small images sharp when scaled up."""
    dims = "" if size is None else f' width="{size[0]}" height="{size[1]}"'
    cls = ' class="pixels"' if pixels else ""
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}"{dims}{cls}>'


def figure(png: bytes, alt: str, caption: str, *, pixels: bool = False) -> str:
    """A figure with its caption (HTML: the caller escapes any text in it)."""
    return (f"<figure>{img(png, alt, pixels=pixels)}<figcaption>{caption}</figcaption>"
            "</figure>")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], *,
          caption: str | None = None, numeric: Sequence[int] = (), html_cells: bool = False,
          cls: str | None = None) -> str:
    """A table; cells are escaped unless `html_cells`, columns in `numeric` align as numbers."""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = []
    for row in rows:
        cells = [str(cell) if html_cells else prose(cell) for cell in row]
        body.append("<tr>" + "".join(
            f'<th scope="row">{text}</th>' if i == 0 else
            f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>"
            for i, text in enumerate(cells)) + "</tr>")
    attr = f' class="{esc(cls)}"' if cls else ""
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return (f"<table{attr}>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            "</tbody></table>")


def paragraphs(texts: Sequence[str], cls: str | None = None) -> str:
    attr = f' class="{cls}"' if cls else ""
    return "".join(f"<p{attr}>{prose(t)}</p>" for t in texts)


def bullets(texts: Sequence[str]) -> str:
    return "<ul>" + "".join(f"<li>{prose(t)}</li>" for t in texts) + "</ul>"


def not_run(stage: str, what: str) -> str:
    """The body of a section whose stage did not run (or whose output was not given)."""
    return (f'<p class="not-run">Not run: no output of the <code>{esc(stage)}</code> stage '
            f"was given, so this report has no {esc(what)}.</p>")


@dataclass(frozen=True)
class Section:
    """One `<section>` of the page: `body` is HTML."""

    id: str
    title: str
    body: str


def render(*, title: str, lede: str, warnings: Sequence[str],
           glance: Sequence[tuple[str, str, str]], sections: Sequence[Section],
           footer: str) -> str:
    """The whole page. `warnings`: banners under the title; `glance`: (label, value,
    note), the key numbers shown first."""
    boxes = "".join(f"<div><dt>{esc(label)}</dt><dd>{prose(value)}"
                    f"{f'<small>{prose(note)}</small>' if note else ''}</dd></div>"
                    for label, value, note in glance)
    toc = "".join(f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a></li>' for s in sections)
    body = "".join(f'<section id="{esc(s.id)}" aria-labelledby="{esc(s.id)}-h">'
                   f'<h2 id="{esc(s.id)}-h">{esc(s.title)}</h2>{s.body}</section>'
                   for s in sections)
    warn = "".join(f'<p class="warning" role="alert">{prose(w)}</p>' for w in warnings)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        # nothing on this page may be fetched: everything is inline
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f'<body><main><header><h1>{esc(title)}</h1><p class="lede">{prose(lede)}</p>{warn}'
        f'<dl class="glance">{boxes}</dl>'
        f'<nav aria-label="Contents"><h2 class="muted" style="border:0;margin:0;padding:0;'
        f'font-size:1rem">Contents</h2><ol>{toc}</ol></nav></header>{body}'
        f"<footer>{footer}</footer></main></body></html>\n")

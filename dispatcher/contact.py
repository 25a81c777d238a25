"""Contact sheets: a batch's images as thumbnails with row id, prompt and seed, failed rows shown as such. An HTML
page with the thumbnails inside it (one file that opens anywhere, offline), or one PNG grid."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from dispatcher.images import THUMB, jpeg, thumbnail

COLUMNS = 6  # per row of the PNG sheet
CAPTION = 36  # pixels under each PNG thumbnail


@dataclass(frozen=True)
class Tile:
    """One job of the batch, as the sheet shows it."""

    row: str
    prompt: str
    seed: int | None
    status: str
    error: str | None
    thumbnail: Image.Image | None  # None: no image (not succeeded, or its object is gone)


def tiles(rows: Iterable[dict[str, Any]], read: Callable[[dict[str, Any]], bytes | None]) -> list[Tile]:
    """A tile per export row (dispatcher.store.export_rows); `read(row)` gives its stored image's bytes."""
    found = []
    for r in rows:
        small = thumbnail(read(r)) if r["kiln_status"] == "succeeded" else None
        row = r.get("id") or f"row {r['kiln_row']}" + (f" #{r['kiln_variant']}" if r.get("kiln_variant") else "")
        found.append(Tile(str(row), r["kiln_prompt"], r["kiln_seed"], r["kiln_status"], r["kiln_error"], small))
    return found


def page(sheet: list[Tile], title: str) -> str:
    """A self-contained HTML page: thumbnails as JPEG data URIs, no script, no network."""
    cells = []
    for t in sheet:
        if t.thumbnail is not None:
            picture = (f'<img alt="{html.escape(t.row)}" src="data:image/jpeg;base64,'
                       f'{base64.b64encode(jpeg(t.thumbnail)).decode()}">')
        else:
            picture = f'<div class="missing">{html.escape(t.status)}</div>'
        problem = f'<p class="error">{html.escape(t.error)}</p>' if t.error else ""
        cells.append(f'<figure class="{html.escape(t.status)}">{picture}<figcaption><b>{html.escape(t.row)}</b> '
                     f'<span>{html.escape(t.status)}, seed {t.seed}</span><p>{html.escape(t.prompt)}</p>{problem}'
                     "</figcaption></figure>")
    style = ("body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa}"
             "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:1em}"
             f"figure{{margin:0;background:#fff;border:1px solid #ddd;padding:.5em}}img{{max-width:100%}}"
             f".missing{{height:{THUMB}px;display:flex;align-items:center;justify-content:center;background:#eee;"
             "color:#a00;font-weight:bold}figure.failed,figure.dead{border-color:#c33}"
             "figcaption p{margin:.3em 0;color:#444}.error{color:#a00!important}")
    done = sum(t.status == "succeeded" for t in sheet)
    return (f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style><h1>{html.escape(title)}</h1><p>{done} of {len(sheet)} images</p>"
            f"<main>{''.join(cells)}</main></html>\n")


def grid(sheet: list[Tile]) -> bytes:
    """One PNG: thumbnails in rows of COLUMNS, each captioned with its row id and status."""
    columns = max(1, min(COLUMNS, len(sheet)))
    rows = max(1, -(-len(sheet) // columns))
    cell_w, cell_h = THUMB + 8, THUMB + CAPTION
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(sheet):
        x, y = (i % columns) * cell_w + 4, (i // columns) * cell_h + 4
        if t.thumbnail is not None:
            canvas.paste(t.thumbnail, (x + (THUMB - t.thumbnail.width) // 2, y + (THUMB - t.thumbnail.height) // 2))
        else:
            draw.rectangle((x, y, x + THUMB - 1, y + THUMB - 1), fill=(238, 238, 238), outline=(204, 51, 51))
            draw.text((x + 8, y + THUMB // 2), t.status, fill=(170, 0, 0))
        draw.text((x, y + THUMB + 4), f"{t.row} (seed {t.seed})"[:40], fill=(0, 0, 0))
    out = io.BytesIO()
    canvas.save(out, "PNG")
    return out.getvalue()

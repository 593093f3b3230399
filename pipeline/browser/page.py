"""The error browser page: one static HTML file, its style, script and data inline.

Decisions:
- Data is JSON inside `<script type="application/json">`, read by `JSON.parse(textContent)`
  and shown with `textContent` only: a subtitle or clip name is never parsed as markup. `<`,
  `>` and `&` are written as `\\u003c`-style escapes, so no `</script>` or `<!--` can end or
  bend the data block, and U+2028/U+2029 are escaped for older JavaScript parsers.
- The assets (`assets/browser.{html,css,js}`) are plain files in the package, not Python
  strings, so they read and diff as what they are; placeholders are filled style and script
  first and data last, so nothing in the data can be taken for a placeholder.
- A Content-Security-Policy allows the page's own script by its hash, inline styles and images
  beside the page, and nothing else (no fetch, no remote script): a second line of defence
  should markup ever slip into the page, and a guarantee that the page loads nothing remote.
- No third-party JavaScript: tables, bars and paging are a few hundred lines of DOM code,
  which keeps the page a few tens of KB plus its data.
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from pathlib import Path

from pipeline.labels import EMOTIONS
from pipeline.tables import write_text_atomic
from pipeline.browser.records import COLUMNS, SCALE

_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
PAGE_SIZE = 50  # clip cards per page: the DOM stays small whatever the clip count


def script_json(data: object) -> str:
    """JSON safe to place verbatim inside a `<script type="application/json">` element."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def asset(name: str) -> str:
    return resources.files("pipeline.browser").joinpath("assets", name).read_text(encoding="utf-8")


REFINE_USES = ("unknown", "unused", "trained", "in_folds")  # what train did with refine's labels: stages/browser.refine_use


def payload(stores: list[str], rows: list[list], title: str, refine_use: str = "unknown") -> dict:
    if refine_use not in REFINE_USES:
        raise ValueError(f"refine_use {refine_use!r} is not one of {REFINE_USES}")
    return {"title": title, "classes": list(EMOTIONS), "stores": stores, "columns": list(COLUMNS),
            "scale": SCALE, "page_size": PAGE_SIZE, "refine_use": refine_use, "rows": rows}


def content_policy(script: str) -> str:
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    return (f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
            "img-src 'self' file: data:")


def render_page(stores: list[str], rows: list[list], title: str = "MER error browser", refine_use: str = "unknown") -> str:
    page, script = asset("browser.html"), asset("browser.js")
    for token, text in (("__MER_CSP__", content_policy(script)), ("/*__MER_STYLE__*/", asset("browser.css")),
                        ("/*__MER_SCRIPT__*/", script), ("__MER_DATA__", script_json(payload(stores, rows, title, refine_use)))):
        if page.count(token) != 1:  # filled in this order, data last: nothing in the data is taken for a token
            raise AssertionError(f"assets/browser.html must hold {token} exactly once")
        page = page.replace(token, text)
    return page


def write_page(path: Path, stores: list[str], rows: list[list], title: str = "MER error browser",
               refine_use: str = "unknown") -> int:
    """Write the page atomically; returns its size in bytes. `refine_use`: what train did with refine's
    labels (REFINE_USES), so a card says whether a refined or flagged label was trained on."""
    text = render_page(stores, rows, title, refine_use)
    write_text_atomic(path, text)
    return len(text.encode("utf-8"))

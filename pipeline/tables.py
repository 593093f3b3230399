"""The small writers every stage and benchmark shares: one atomic text writer (temp + rename),
JSON lines, JSON summaries (metrics), result tables, rounded metrics."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm import tqdm


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` under a temporary name, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="\n")
    os.replace(tmp, path)


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """JSON lines (sorted keys, UTF-8 kept), atomically."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows))


def write_json(path: str | Path, data: Any, sort_keys: bool = True) -> None:
    """A JSON summary or metrics file: indented, sorted keys (or the order given: `dvc exp show` keeps
    a metrics file's key order, so the headline score can come first), atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]]) -> str:
    """A markdown table: the header, its separator, one line per row of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(out: str | Path, rows: list[dict[str, Any]], markdown: str) -> None:
    """A result table as `<out>.json` (the rows) and `<out>.md` (its markdown), then printed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown)
    print(markdown)


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr: live on a terminal; under `dvc repro` piped to a log, one line at
    most every 30 s, so a long stage is never silent and a log is never flooded."""
    live = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                mininterval=0.1 if live else 30.0, ascii=not live, dynamic_ncols=live)


def rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded to `digits` throughout nested dicts and lists (stable metrics files)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj

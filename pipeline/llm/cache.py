"""The answers cache shared by the LLM stages: one SQLite table, JSON values, no pickle.

Keys hold no clip name (format 2): caches written by keys with clip names (before) are
simply missed, never misread."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from pipeline.llm.base import CONTROL_CHARS, template_hash, user_message


class LLMCache:
    """Answers in one SQLite table (WAL), keyed by what determines them; JSON values, no pickle."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=60.0)  # waits while another stage writes
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.commit()

    @staticmethod
    def key(identity: dict[str, Any], template: str, kind: str, text: str,
            settings: dict[str, Any] | None = None) -> str:
        """sha256 of model identity, template hash, kind (enrich|labels), text, settings.

        The text, not the clip: greedy answers depend on the prompt alone, so clips that share
        a subtitle, in one batch or across batches, runs and datasets, share one answer."""
        # a subtitle with < > [ ] is quoted differently since those became \\u escapes (base.user_message):
        # its key holds the new quoted form, so an answer to the earlier prompt is asked again; every
        # other key is what it was, and its cached answer stays
        asked = user_message(text) if set(CONTROL_CHARS) & set(text) else text
        parts = [identity, template_hash(template), kind, asked, settings or {}]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> Any | None:
        row = self.db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value_json: str) -> None:
        """Stage one answer (a JSON string); `commit()` after each batch makes it durable."""
        json.loads(value_json)  # refuse anything that would not read back
        self.db.execute("INSERT OR REPLACE INTO answers (key, value) VALUES (?, ?)", (key, value_json))

    def commit(self) -> None:
        self.db.commit()

    def close(self) -> None:
        self.db.close()

"""A new or fixed clip is the only clip extracted again (README "Feature stores": a new or fixed clip).

DVC removes a stage's output before it reruns the stage, on any change to data/media.jsonl, but
keeps a copy in its cache. A finished store is described in `.partial/<store>.previous.json`
(its MD5, fingerprint, code digest, device, and each clip's digest of what the extractor
reads). A rerun with the same fingerprint, code and device finds the store by its MD5, at the
path (`mer extract` again) or in DVC's cache (`Reuse.locate`), takes every clip whose digest is
unchanged, and extracts only new or changed clips. In any doubt it takes nothing: every clip
is extracted. A store at the path that is not the described file is not trusted (its clips are
extracted again); segments record each clip's digest, the code and the device, so a clip
replaced after an interrupted run, or a run resumed on another device, is extracted again; an older version's segments count as done but are
described with no digest, so the next run redoes them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from pipeline.store import StoreError, StoreIdentity, StoreReader, StoreWriter


@dataclass(frozen=True)
class Reuse:
    """What decides whether a clip's row from the previous run still holds."""

    clips: Mapping[str, str]  # clip name -> digest of what the extractor reads for it
    code: str
    locate: Callable[[str], Path | None] = lambda md5: None  # a file of this MD5 (DVC's cache), if any
    device: str = "cpu"  # a GPU's values differ from the CPU's in their last bits: never mixed in one store


def file_md5(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


class ReusingStoreWriter(StoreWriter):
    """StoreWriter that takes the unchanged clips of the previous run (module docstring).
    `reused`: those clips; `not_reused_because`: why none were, for the log."""

    def __init__(self, path: str | Path, identity: StoreIdentity, sequence_keys: Iterable[str] = (),
                 restart: bool = False, *, reuse: Reuse):
        self.reuse = reuse
        self.description = Path(path).parent / ".partial" / f"{Path(path).stem}.previous.json"
        self._unverified: set[str] = set()  # committed by an older version: done, but described without a digest
        self.previous: Path | None = None
        self._previous_reader: StoreReader | None = None
        super().__init__(path, identity, sequence_keys, restart)
        self.reused, self.not_reused_because = self._scan_previous()
        self._done |= self.reused

    def _scan_previous(self) -> tuple[set[str], str]:
        """The previous store is the one at the path when it is the file described, else DVC's
        copy; its reader stays open to `finalize` (a `dvc gc` meanwhile cannot take it away)."""
        if not self.description.exists():
            return set(), "no previous run described"
        try:
            meta = json.loads(self.description.read_text(encoding="utf-8"))
            md5, fingerprint, code, device = meta["md5"], meta["fingerprint"], meta["code"], meta["device"]
            kept = dict(meta["clips"])
            if not (isinstance(md5, str) and len(md5) == 32 and all(c in "0123456789abcdef" for c in md5)):
                raise ValueError(f"md5 {md5!r}")
        except KeyError as err:
            return set(), f"its description {self.description} lacks {err} (an older version wrote it)"
        except (OSError, ValueError, TypeError) as err:
            return set(), f"its description {self.description} is unreadable ({err})"
        if fingerprint != self.identity.fingerprint:
            return set(), "the previous run had other settings"
        if code != self.reuse.code:
            return set(), "the previous run had other code"
        if device != self.reuse.device:
            return set(), f"the previous run ran on {device}, this one on {self.reuse.device}"
        where = self.path if self.path.exists() and file_md5(self.path) == md5 else self.reuse.locate(md5)
        if where is None or not where.is_file():
            return set(), "its store is not in DVC's cache"
        try:
            reader = StoreReader(where)
        except (StoreError, OSError) as err:
            return set(), f"{where} is unreadable ({err})"
        if reader.attrs.get("fingerprint") != self.identity.fingerprint:
            reader.close()
            return set(), f"{where} has other settings"
        self.previous, self._previous_reader = where, reader
        return {n for n in reader.names if kept.get(n) is not None and kept[n] == self.reuse.clips.get(n)}, ""

    def _holding(self, source: Path, reader: StoreReader) -> set[str]:
        if source == self.path:  # taken only as the described previous run (above): otherwise unknown
            return set()
        made_from = json.loads(reader.attrs.get("clip_digests_json", "null"))
        if made_from is None:  # an older version's segment
            self._unverified.update(reader.names)
            return set(reader.names)
        if reader.attrs.get("code") != self.reuse.code:
            return set()
        # an interrupted run resumed on another device: its rows are redone, never mixed into one store
        # (a segment written before segments named their device is taken as this run's)
        if reader.attrs.get("device", self.reuse.device) != self.reuse.device:
            return set()
        return {n for n in reader.names if made_from.get(n) == self.reuse.clips.get(n)}

    def _segment_attrs(self, names: list[str]) -> dict[str, str]:
        return {"clip_digests_json": json.dumps({n: self.reuse.clips.get(n) for n in names}, sort_keys=True),
                "code": self.reuse.code, "device": self.reuse.device}

    def _earlier_rows(self) -> list[tuple[StoreReader, set[str]]]:
        reader, self._previous_reader = self._previous_reader, None
        return [(reader, self.reused)] if reader is not None else []

    def _finished(self, names: list[str]) -> None:
        """What the finished store is and was made from, for the next run (`_scan_previous`)."""
        clips = {n: None if n in self._unverified else self.reuse.clips.get(n) for n in names}
        meta = {"md5": file_md5(self.path), "fingerprint": self.identity.fingerprint, "code": self.reuse.code,
                "device": self.reuse.device, "clips": clips}
        tmp = self.description.with_name(self.description.name + ".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.description)

    def discard(self) -> None:
        """Forget all work, the previous run's description too."""
        super().discard()
        self.description.unlink(missing_ok=True)

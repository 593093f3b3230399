"""HDF5 feature stores: the only module that imports h5py.

One file per extractor, `features/<store>.h5`:
    attrs   schema_version, store, extractor, params_json, fingerprint, fingerprint_inputs_json
    names   (N,) utf-8 clip names, in manifest order
    data/<key>           (N, ...) for per-clip arrays of one shape (e.g. the utterance vector)
    data/<key>/values    (sum T, ...) and data/<key>/offsets (N+1,) for sequences of varying length
    complete (N,) uint8  written last: a row counts only when its marker is 1

Crash safety (HDF5 has no journal): finished work never sits in a file open for writing.
Clips are committed as small segment files (`features/.partial/<store>/part-NNNNNN.h5`, each
written to a temp name and renamed), merged in manifest order into the final file (temp +
rename) when every clip is done; a rerun after `kill -9` skips the committed clips. Files carry
no timestamps (`track_times=False`): the same features give the same bytes, and DVC does not
rerun downstream stages for nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from pipeline.errors import MerError
from pipeline.tables import write_jsonl

SCHEMA_VERSION = 1
PRESENT_KEY = "present"  # optional per-clip scalar: 0 = the clip lacks this modality (no face, silence)
_STR = h5py.string_dtype(encoding="utf-8")
_BLOCK = 1024  # clips copied per block when writing or merging
log = logging.getLogger(__name__)


class FingerprintMismatch(MerError, RuntimeError):
    """Existing store or segments were made with other settings than the current ones."""


class StoreError(MerError, RuntimeError):
    """A store file is unreadable or inconsistent; the message names the file."""


@dataclass(frozen=True)
class StoreIdentity:
    """Everything that decides the values in a store; its hash is the fingerprint."""

    store: str
    extractor: str
    params: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)  # weights path + hash, model name
    versions: dict[str, str] = field(default_factory=dict)  # libraries that change values

    def inputs(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "store": self.store, "extractor": self.extractor,
                "params": self.params, "model": self.model, "versions": self.versions}

    @property
    def fingerprint(self) -> str:
        canonical = json.dumps(self.inputs(), sort_keys=True, ensure_ascii=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human lines such as `params.n_mfcc: 20 -> 13` between two fingerprint inputs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<unset>") != b.get(k, "<unset>")]


def _check_identity(path: Path, attrs: Any, identity: StoreIdentity, restart_hint: str) -> None:
    if attrs.get("fingerprint") == identity.fingerprint:
        return
    old = json.loads(attrs.get("fingerprint_inputs_json", "{}"))
    changes = describe_changes(old, identity.inputs()) or ["(fingerprint differs)"]
    raise FingerprintMismatch(
        f"{path} was made with other settings than the current ones:\n  "
        + "\n  ".join(changes)
        + f"\nTo start over with the new settings: {restart_hint}. "
        "To keep the old features, restore the old params instead."
    )


def _write_file(path: Path, identity: StoreIdentity, names: list[str],
                rows: Sequence[Mapping[str, np.ndarray]], sequence_keys: Iterable[str],
                attrs: Mapping[str, str] | None = None) -> None:
    """Write one complete store file atomically (temp name, then rename).

    `rows` may be lazy (rows read from other stores on demand): values are copied in
    blocks of `_BLOCK` clips, so merging a store of any size keeps memory flat.
    `attrs`: more file attributes (a segment's `StoreWriter._segment_attrs`).
    """
    sequence_keys = set(sequence_keys)
    keys = sorted(rows[0]) if rows else []
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="earliest") as f:
        _write_attrs(f, identity, sequence_keys)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        f.create_dataset("names", data=np.array(names, dtype=object), dtype=_STR, track_times=False)
        data = f.create_group("data")
        for key in keys:
            if key in sequence_keys:
                _write_ragged(data, key, rows, path)
            else:
                _write_fixed(data, key, rows, path)
        # The marker goes last: a reader trusts only rows whose marker is 1.
        f.create_dataset("complete", data=np.ones(len(names), np.uint8), track_times=False)
    os.replace(tmp, path)


def _write_attrs(f: h5py.File, identity: StoreIdentity, sequence_keys: set[str]) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["store"] = identity.store
    f.attrs["extractor"] = identity.extractor
    f.attrs["params_json"] = json.dumps(identity.params, sort_keys=True, default=str)
    f.attrs["fingerprint"] = identity.fingerprint
    f.attrs["fingerprint_inputs_json"] = json.dumps(identity.inputs(), sort_keys=True, default=str)
    f.attrs["sequence_keys_json"] = json.dumps(sorted(sequence_keys))


def _value_of(row: Mapping[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(row[key])
    except KeyError:
        raise StoreError(f"{path}: a clip has no output {key!r}; every clip needs the same outputs") from None


def _write_fixed(group: h5py.Group, key: str, rows: Sequence[Mapping[str, np.ndarray]], path: Path) -> None:
    first = _value_of(rows[0], key, path)
    ds = group.create_dataset(key, shape=(len(rows),) + first.shape, dtype=first.dtype, track_times=False)
    for start in range(0, len(rows), _BLOCK):
        block = [_value_of(rows[i], key, path) for i in range(start, min(start + _BLOCK, len(rows)))]
        shapes = {b.shape for b in block} | {first.shape}
        if len(shapes) > 1:
            raise StoreError(f"{path}: output {key!r} has several shapes {sorted(shapes)}; "
                             "declare it a sequence key")
        ds[start:start + len(block)] = np.stack(block)


def _write_ragged(group: h5py.Group, key: str, rows: Sequence[Mapping[str, np.ndarray]], path: Path) -> None:
    lengths = np.array([len(_value_of(r, key, path)) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    first = _value_of(rows[0], key, path)
    sub = group.create_group(key)
    values = sub.create_dataset("values", shape=(int(offsets[-1]),) + first.shape[1:], dtype=first.dtype,
                                track_times=False)
    for start in range(0, len(rows), _BLOCK):
        stop = min(start + _BLOCK, len(rows))
        block = [_value_of(rows[i], key, path) for i in range(start, stop)]
        if offsets[stop] > offsets[start]:
            values[offsets[start]:offsets[stop]] = np.concatenate(block)
    sub.create_dataset("offsets", data=offsets, track_times=False)


DISABLED = {"disabled": True}  # the params of a store written empty because its stage is off


class StoreReader:
    """Read access to one store file (final or segment); only complete rows are seen."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except (OSError, FileNotFoundError) as err:
            raise StoreError(f"cannot open feature store {self.path}: {err}") from err
        f = self._file
        if f.attrs.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {f.attrs.get('schema_version')} "
                             f"is not {SCHEMA_VERSION}; re-extract this store")
        complete = f["complete"][()].astype(bool) if "complete" in f else np.zeros(0, bool)
        all_names = [n.decode() if isinstance(n, bytes) else n for n in f["names"][()]]
        self._row = {n: i for i, n in enumerate(all_names) if i < len(complete) and complete[i]}
        self.attrs = dict(f.attrs)
        self._keys = sorted(f["data"].keys()) if "data" in f else []
        self.sequence_keys = set(json.loads(self.attrs.get("sequence_keys_json", "[]")))

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def names(self) -> list[str]:
        return list(self._row)

    @property
    def empty(self) -> bool:
        """No clip is stored: none had the modality (an audio-only dataset's `frames` store)."""
        return not self._row

    @property
    def disabled(self) -> bool:
        """Written empty because its stage is switched off (`llm.enabled: false`), not because no clip had it."""
        return self.empty and json.loads(self.attrs.get("params_json", "{}")) == DISABLED

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def get(self, name: str) -> dict[str, np.ndarray]:
        """All outputs of one clip."""
        i = self._row[name]
        return {key: self._value(key, i) for key in self.keys}

    def _value(self, key: str, i: int) -> np.ndarray:
        node = self._file["data"][key]
        if key in self.sequence_keys:
            start, stop = node["offsets"][i:i + 2]
            return node["values"][start:stop]
        return node[i]

    def read(self, key: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-clip array `key` aligned to `names` (zeros where absent) and a presence mask.

        The mask is 1 where the clip is in the store, its `present` flag (if written) is set (a clip
        with no face is stored but not present) and its row is finite: a NaN row is absent, zeroed, said.
        """
        if key in self.sequence_keys:
            raise StoreError(f"{self.path}: {key!r} is a sequence; use read_sequences()")
        if key not in self._keys:
            if self.empty:  # no clip had the modality: a valid store, every clip missing
                return np.zeros((len(names), 0), np.float32), np.zeros(len(names), bool)
            raise StoreError(f"{self.path} has no output {key!r}; it has {', '.join(self._keys)}")
        node = self._file["data"][key]
        out = np.zeros((len(names),) + node.shape[1:], dtype=node.dtype)
        mask = np.zeros(len(names), dtype=bool)
        rows = [(j, self._row[n]) for j, n in enumerate(names) if n in self._row]
        if rows:
            dst, src = map(np.array, zip(*rows))
            order = np.argsort(src)  # h5py fancy indexing needs increasing indices
            out[dst[order]] = node[src[order]]
            mask[dst] = True
        if PRESENT_KEY in self.keys and key != PRESENT_KEY:
            mask &= self.read(PRESENT_KEY, names)[0].astype(bool)
        if (bad := mask & ~np.isfinite(out).all(axis=tuple(range(1, out.ndim)))).any():
            log.warning("%s: %d clips with non-finite values are treated as missing this modality",
                        self.path, int(bad.sum()))
            mask &= ~bad
            out[bad] = 0
        return out, mask

    def read_sequences(self, key: str, names: list[str]) -> tuple[list[np.ndarray | None], np.ndarray]:
        """Variable-length sequences aligned to `names` (None where absent) and the mask."""
        if key not in self._keys and self.empty:
            return [None] * len(names), np.zeros(len(names), bool)
        seqs = [self._value(key, self._row[n]) if n in self._row else None for n in names]
        _, mask = self.read(PRESENT_KEY, names) if PRESENT_KEY in self.keys else (None, None)
        present = np.array([s is not None for s in seqs], dtype=bool)
        return seqs, present if mask is None else present & mask


class _LazyRow(Mapping[str, np.ndarray]):
    """One clip's outputs, read from its store only when a key is asked for."""

    def __init__(self, reader: StoreReader, name: str):
        self._reader, self._index = reader, reader._row[name]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._reader._keys:
            raise KeyError(key)
        return self._reader._value(key, self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._reader.keys)

    def __len__(self) -> int:
        return len(self._reader.keys)


class StoreWriter:
    """Resumable writer: buffer clips, commit segments atomically, merge at the end. Its hooks let
    a subclass judge committed rows and take a previous run's (pipeline/extract/reuse.py)."""

    def __init__(self, path: str | Path, identity: StoreIdentity, sequence_keys: Iterable[str] = (),
                 restart: bool = False):
        self.path = Path(path)
        self.identity = identity
        self.sequence_keys = set(sequence_keys)
        self.partial_dir = self.path.parent / ".partial" / self.path.stem
        self._buffer: list[tuple[str, dict[str, np.ndarray]]] = []
        if restart:
            self.discard()
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.partial_dir.glob("*.tmp"):
            tmp.unlink()  # a segment that never got renamed is unfinished work
        self._stale: set[tuple[Path, str]] = set()  # committed rows that no longer hold (`_holding`)
        self._done = self._scan_done()

    def _restart_hint(self) -> str:
        return f"delete {self.path} and {self.partial_dir} (or run `mer extract {self.identity.store} --restart`)"

    def _segments(self) -> list[Path]:
        return sorted(self.partial_dir.glob("part-*.h5"))

    def _scan_done(self) -> set[str]:
        done: set[str] = set()
        sources = ([self.path] if self.path.exists() else []) + self._segments()
        for source in sources:
            with StoreReader(source) as reader:
                _check_identity(source, reader.attrs, self.identity, self._restart_hint())
                held = self._holding(source, reader)
                done.update(held)
                self._stale.update((source, n) for n in reader.names if n not in held)
        return done

    def _holding(self, source: Path, reader: StoreReader) -> set[str]:
        """The clips of a committed file (the store at the path, a segment) that still hold: all."""
        return set(reader.names)

    def _segment_attrs(self, names: list[str]) -> dict[str, str]:  # more attributes of a segment file
        return {}

    def _earlier_rows(self) -> list[tuple[StoreReader, set[str]]]:  # (reader, its clips) merged first
        return []

    def _finished(self, names: list[str]) -> None:  # called with the finished store's clips
        return None

    @property
    def done(self) -> set[str]:
        """Clips already committed to disk (final store or segments)."""
        return set(self._done)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def add(self, name: str, outputs: dict[str, np.ndarray]) -> None:
        if name in self._done or any(n == name for n, _ in self._buffer):
            raise StoreError(f"{self.path}: clip {name!r} written twice")
        self._buffer.append((name, {k: np.asarray(v) for k, v in outputs.items()}))

    def flush(self) -> None:
        """Commit buffered clips as one new segment; after this they survive `kill -9`."""
        if not self._buffer:
            return
        segments = self._segments()
        index = int(segments[-1].stem.split("-")[1]) + 1 if segments else 1
        names = [n for n, _ in self._buffer]
        _write_file(self.partial_dir / f"part-{index:06d}.h5", self.identity, names,
                    [r for _, r in self._buffer], self.sequence_keys, self._segment_attrs(names))
        self._done.update(names)
        self._buffer.clear()

    def finalize(self, order: list[str]) -> int:
        """Merge earlier rows, the final store and all segments into one file in `order` (later
        sources win, rows that no longer hold are left out); returns rows."""
        self.flush()
        earlier = self._earlier_rows()
        readers = [StoreReader(source) for source in ([self.path] if self.path.exists() else []) + self._segments()]
        try:
            where = {name: reader for reader, names in earlier for name in names}
            where.update({name: reader for reader in readers for name in reader.names
                          if (reader.path, name) not in self._stale})
            names = [n for n in order if n in where]
            rows = [_LazyRow(where[n], n) for n in names]
            _write_file(self.path, self.identity, names, rows, self.sequence_keys)
        finally:
            for reader in readers + [reader for reader, _ in earlier]:
                reader.close()
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self._finished(names)
        return len(names)

    def discard(self) -> None:
        """Forget all work: remove the final store and every segment."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.partial_dir, ignore_errors=True)


def write_empty_store(path: str | Path, identity: StoreIdentity) -> None:
    """A valid store holding no clip (a stage switched off, e.g. `llm.enabled: false`); readers see it as empty."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_file(Path(path), identity, [], [], ())


def write_failures(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Failures beside the store as JSON lines `{id, stage, modality, kind, error}`."""
    write_jsonl(path, records)

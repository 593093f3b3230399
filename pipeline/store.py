"""HDF5 feature stores: the only module that imports h5py.

One file per extractor, `features/<store>.h5`:
    attrs   schema_version, store, extractor, params_json, fingerprint, fingerprint_inputs_json
    names   (N,) utf-8 clip names, in manifest order
    data/<key>           (N, ...) for per-clip arrays of one shape (e.g. the utterance vector)
    data/<key>/values    (sum T, ...) and data/<key>/offsets (N+1,) for sequences of varying length
    complete (N,) uint8  written last: a row counts only when its marker is 1

Crash safety. HDF5 has no journal: a process killed while HDF5 metadata is half
written can leave the whole file unreadable. So finished work never sits in a file that
is open for writing. Clips are buffered and committed as small segment files
(`features/.partial/<store>/part-NNNNNN.h5`), each written to a temp name and renamed
into place, so a segment either exists whole or not at all. When every clip is done the
segments are merged, in manifest order, into the final file (again temp + rename) and
removed. A rerun after `kill -9` reads the segments, skips their clips, and redoes only
the clips that were in memory. Files carry no timestamps (`track_times=False`), so the
same features give the same bytes and DVC does not rerun downstream stages for nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from pipeline.errors import MerError
from pipeline.tables import write_jsonl

SCHEMA_VERSION = 1
PRESENT_KEY = "present"  # optional per-clip scalar: 0 = the clip lacks this modality (no face, silence)
_STR = h5py.string_dtype(encoding="utf-8")
_BLOCK = 1024  # clips copied per block when writing or merging


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
                made_from: tuple[Mapping[str, str | None], str] | None = None) -> None:
    """Write one complete store file atomically (temp name, then rename).

    `rows` may be lazy (rows read from other stores on demand): values are copied in
    blocks of `_BLOCK` clips, so merging a store of any size keeps memory flat.
    `made_from` (segments only): what each clip was extracted from (`Reuse.clips`), and the code.
    """
    sequence_keys = set(sequence_keys)
    keys = sorted(rows[0]) if rows else []
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="earliest") as f:
        _write_attrs(f, identity, sequence_keys)
        if made_from is not None:
            f.attrs["clip_digests_json"] = json.dumps(dict(made_from[0]), sort_keys=True)
            f.attrs["code"] = made_from[1]
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

        The mask is 1 where the clip is in the store and, if the extractor wrote a
        `present` flag, that flag is set (a clip with no face is stored but not present).
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
            present, _ = self.read(PRESENT_KEY, names)
            mask &= present.astype(bool)
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


def read_features(path: str | Path, key: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Shortcut: `StoreReader(path).read(key, names)`."""
    with StoreReader(path) as reader:
        return reader.read(key, names)


@dataclass(frozen=True)
class Reuse:
    """What decides whether a clip's row from the previous run still holds (StoreWriter `reuse`):
    the digest of what the extractor reads for each clip and of the code that computes it, and
    where a finished store can be read back by its MD5 (DVC's cache: `locate`)."""

    clips: Mapping[str, str]  # clip name -> digest of what the extractor reads for it
    code: str
    locate: Callable[[str], Path | None] = lambda md5: None
    device: str = "cpu"  # a GPU's values differ from the CPU's in their last bits: never mixed in one store


def file_md5(path: Path) -> str:
    md5 = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            md5.update(block)
    return md5.hexdigest()


class StoreWriter:
    """Resumable writer: buffer clips, commit segments atomically, merge at the end.

    `reuse`: a finished store is described in `.partial/<store>.previous.json` (its MD5,
    fingerprint, code digest and each clip's digest). DVC removes a stage's output before it
    reruns the stage, but keeps a copy in its cache, where `reuse.locate` finds it by the MD5. A
    rerun with the same fingerprint and code takes from it every clip whose digest is unchanged
    and extracts only new or changed clips. In any doubt (no description, other settings or
    code, the copy gone from the cache, an unreadable file) it takes nothing: every clip is
    extracted. Rows whose provenance is unknown (a finished store at the path, from `mer
    extract`, or segments written before digests were recorded) are described with no digest,
    so a later run extracts them again rather than trust them.
    """

    def __init__(self, path: str | Path, identity: StoreIdentity, sequence_keys: Iterable[str] = (),
                 restart: bool = False, reuse: Reuse | None = None):
        self.path = Path(path)
        self.identity = identity
        self.sequence_keys = set(sequence_keys)
        self.partial_dir = self.path.parent / ".partial" / self.path.stem
        self.description = self.path.parent / ".partial" / f"{self.path.stem}.previous.json"
        self.reuse = reuse
        self._buffer: list[tuple[str, dict[str, np.ndarray]]] = []
        if restart:
            self.discard()
        self.partial_dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.partial_dir.glob("*.tmp"):
            tmp.unlink()  # a segment that never got renamed is unfinished work
        self.previous: Path | None = None
        self.reused, self.not_reused_because = self._scan_previous()
        self._done = self._scan_done() | self.reused

    def _restart_hint(self) -> str:
        return f"delete {self.path} and {self.partial_dir} (or run `mer extract {self.identity.store} --restart`)"

    def _segments(self) -> list[Path]:
        return sorted(self.partial_dir.glob("part-*.h5"))

    def _scan_previous(self) -> tuple[set[str], str]:
        """The previous run's clips that still hold, and why none do when that is so (for the log).
        The previous store is the one at the path when it is the file described (`mer extract`
        again), else DVC's copy (`dvc repro` removed the path); its reader stays open to finalize."""
        self._previous_reader: StoreReader | None = None
        if self.reuse is None:
            return set(), ""
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

    def _scan_done(self) -> set[str]:
        """Clips committed by an interrupted run (segments) or a finished store at the path. With
        `reuse`, the store at the path counts only as the described previous run (above), and a
        segment's clip whose media or subtitles changed since, or that other code made, is not
        done (`_stale`); segments that record neither (an older version's) count, `_unverified`."""
        done: set[str] = set()
        self._stale: set[tuple[Path, str]] = set()
        self._unverified: set[str] = set()
        sources = ([self.path] if self.path.exists() else []) + self._segments()
        for source in sources:
            with StoreReader(source) as reader:
                _check_identity(source, reader.attrs, self.identity, self._restart_hint())
                made_from = json.loads(reader.attrs.get("clip_digests_json", "null"))
                code = reader.attrs.get("code")
                for name in reader.names:
                    if self.reuse is None:
                        done.add(name)
                    elif source == self.path:  # not the described store: what it was made from is unknown
                        self._stale.add((source, name))
                    elif made_from is None:
                        done.add(name)
                        self._unverified.add(name)
                    elif code != self.reuse.code or made_from.get(name) != self.reuse.clips.get(name):
                        self._stale.add((source, name))
                    else:
                        done.add(name)
        return done

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
                    [r for _, r in self._buffer], self.sequence_keys,
                    None if self.reuse is None else ({n: self.reuse.clips.get(n) for n in names}, self.reuse.code))
        self._done.update(names)
        self._buffer.clear()

    def finalize(self, order: list[str]) -> int:
        """Merge the previous run's reused clips, the final store and all segments into one file
        in `order` (later sources win); returns rows."""
        self.flush()
        readers = [self._previous_reader] if self._previous_reader is not None else []
        readers += [StoreReader(source) for source in ([self.path] if self.path.exists() else []) + self._segments()]
        try:
            where = {name: reader for reader in readers for name in reader.names
                     if (reader is not self._previous_reader or name in self.reused)
                     and (reader is self._previous_reader or (reader.path, name) not in self._stale)}
            names = [n for n in order if n in where]
            rows = [_LazyRow(where[n], n) for n in names]
            _write_file(self.path, self.identity, names, rows, self.sequence_keys)
        finally:
            for reader in readers:
                reader.close()
            self._previous_reader = None
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        if self.reuse is not None:
            self._describe(names)
        return len(names)

    def _describe(self, names: list[str]) -> None:
        """What the finished store is and was made from, for the next run (`_scan_previous`)."""
        meta = {"md5": file_md5(self.path), "fingerprint": self.identity.fingerprint, "code": self.reuse.code,
                "device": self.reuse.device, "clips": {n: None if n in self._unverified else self.reuse.clips.get(n) for n in names}}
        tmp = self.description.with_name(self.description.name + ".tmp")
        tmp.write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.description)

    def discard(self) -> None:
        """Forget all work: remove the final store, every segment and the previous run's description."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        self.description.unlink(missing_ok=True)


def write_empty_store(path: str | Path, identity: StoreIdentity) -> None:
    """A valid store holding no clip (a stage switched off, e.g. `llm.enabled: false`); readers see it as empty."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_file(Path(path), identity, [], [], ())


def store_digest(path: str | Path) -> dict[str, Any]:
    """What a consumer reads from a store, in a few lines: its identity, clip count and a content hash.

    Written by the `<consumer>_store@<store>` DVC stages (pipeline/stages/store_input.py): a
    consumer depends on the folder of these files, so it reruns exactly when a store it names
    changes, whatever params say it names.
    """
    path = Path(path)
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    with StoreReader(path) as reader:
        attrs, clips = reader.attrs, len(reader.names)
    return {"store": str(attrs.get("store", path.stem)), "extractor": str(attrs.get("extractor", "")),
            "fingerprint": str(attrs.get("fingerprint", "")), "clips": clips,
            "bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def write_failures(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Failures beside the store as JSON lines `{id, stage, modality, kind, error}`."""
    write_jsonl(path, records)

"""The one weights digest: sha256 over the first and the last MiB of a file (cheap on 7B
checkpoints, and it changes when the weights do). Each backend keeps the identity format it
has always written, so existing stores keep their fingerprints; they differ only in what
they hash, which the arguments say."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MIB = 1 << 20


def head_tail_sha256(head_file: str | os.PathLike[str], tail_file: str | os.PathLike[str] | None = None,
                     prefix: bytes = b"", tail_always: bool = False) -> str:
    """Hex sha256 of `prefix`, the first MiB of `head_file` and the last MiB of `tail_file` (default:
    the same file). The tail is read only past the first MiB, unless `tail_always` (then the last MiB
    whatever the size, as the two-part Whisper weights need)."""
    digest = hashlib.sha256(prefix)
    with open(head_file, "rb") as fh:
        digest.update(fh.read(MIB))
    tail = Path(tail_file if tail_file is not None else head_file)
    size = tail.stat().st_size
    if tail_always or size > MIB:
        with tail.open("rb") as fh:
            fh.seek(max(0, size - MIB) if tail_always else max(MIB, size - MIB))
            digest.update(fh.read(MIB))
    return digest.hexdigest()

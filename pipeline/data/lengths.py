"""Is a media file cut off? A stream's length as its container's header states it, against where
its decoded packets end (README "Media decoding": a cut-off file is refused, not decoded in part).

Only containers whose header states each stream's length whatever bytes follow are judged:
MP4/MOV and FLAC. A file of these that decodes to well short of that length was cut off (a
partial download or copy), whichever packet the cut fell in: its decoder may stop early without
an error. Not judged, as their stated length follows the bytes present or is not given per
stream here: WAV and AVI (a cut file states the shorter length), MP3 (estimated from the bit
rate: a sound VBR file can state a wrong one), Matroska/WebM (no stream length).
"""

from __future__ import annotations

import av

HEADER_LENGTH_FORMATS = frozenset({"mov", "mp4", "flac"})
TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION = 0.5, 0.1  # intact files here fall short by < 1 ms


def declared_length_s(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """The stream's length as its container's header states it; None where it is not stated there."""
    if not HEADER_LENGTH_FORMATS & set(container.format.name.split(",")):
        return None
    if not (stream.duration and stream.time_base):
        return None
    return float(stream.duration * stream.time_base)


def cut_off(what: str, decoded_s: float, declared_s: float | None) -> str | None:
    """Why the file counts as cut off, or None: `decoded_s` falls short of the header's
    `declared_s` by more than max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION of it)."""
    if declared_s is None or declared_s - decoded_s <= max(TRUNCATION_SLACK_S, TRUNCATION_SLACK_FRACTION * declared_s):
        return None
    return f"truncated: its {what} decodes to {decoded_s:.2f} s of the {declared_s:.2f} s its header declares"

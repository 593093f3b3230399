"""Middle-frame thumbnails, small JPEGs beside the browser page (named by `records.thumb_name`).

Decisions:
- The middle frame is `sample_frames(path, 1)`: the frame on screen at the centre of the one
  segment, i.e. mid-clip, decoded at `MAX_SIDE` by FFmpeg's scaler (no full-size frame in memory).
- A clip whose video cannot be decoded gets no thumbnail and a warning, not a failed stage: the
  extraction stages already record and judge media failures; the page shows "no thumbnail".
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.browser.records import thumb_name
from pipeline.manifest import Clip
from pipeline.tables import progress_bar

log = logging.getLogger(__name__)
MAX_SIDE = 160  # pixels; a card shows the thumbnail at 160 px wide
JPEG_QUALITY = 70  # ~4-6 KB per demo frame; faces stay recognisable


def write_thumbnail(video: str, out: Path) -> None:
    from PIL import Image

    from pipeline.data.media import sample_frames

    frame = sample_frames(video, 1, max_side=MAX_SIDE).images[0]
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(frame).save(tmp, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    tmp.replace(out)


def write_thumbnails(clips: list[Clip], folder: Path) -> dict[str, int]:
    """One JPEG per clip with video; returns counts (written, without video, undecodable)."""
    from pipeline.data.media import MediaError, NoVideoError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {"written": 0, "no_video": 0, "undecodable": 0}
    with progress_bar(len(clips), "thumbnails", "clip") as bar:
        for clip in clips:
            bar.update(1)
            if not clip.has_video:
                counts["no_video"] += 1
                continue
            try:
                write_thumbnail(clip.video, folder / thumb_name(clip.name))
                counts["written"] += 1
            except NoVideoError:  # a well-formed file without a picture (an audio-only MP4): nothing to show
                counts["no_video"] += 1
            except MediaError as err:
                log.warning("no thumbnail for %s: %s", clip.name, err)
                counts["undecodable"] += 1
    return counts

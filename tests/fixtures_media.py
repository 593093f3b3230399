"""Builders for REAL tiny media files (encoded in-process with PyAV) used by tests.

Plain functions, not pytest fixtures, so any test module can import them and
write into its own ``tmp_path``.  Every builder is deterministic and fast.

Video frames encode their index as mean brightness (see ``frame_brightness``)
so a test can tell which frame a sampler picked, even after lossy H.264.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

AUDIO_RATE = 16000


def frame_brightness(index: int, num_frames: int) -> float:
    """Mean luma (0-255) that frame ``index`` of a ``num_frames`` clip is built with."""
    # Spread 30..220 over the clip: far from clipping, wide gaps between frames.
    if num_frames <= 1:
        return 128.0
    return 30.0 + 190.0 * index / (num_frames - 1)


def frame_index_from_image(image: np.ndarray, num_frames: int) -> int:
    """Invert ``frame_brightness``: the frame index an RGB image was built from."""
    step = 190.0 / max(num_frames - 1, 1)
    return int(round((float(image.mean()) - 30.0) / step))


def _pattern(index: int, num_frames: int, size: tuple[int, int], image: np.ndarray | None) -> np.ndarray:
    """RGB frame ``index``: a gradient (or ``image``) rolled by the index, at a set brightness."""
    width, height = size
    if image is None:
        # Low-amplitude gradient: rolling it moves the pattern but keeps the mean fixed.
        ramp = (np.arange(width, dtype=np.float32) / max(width - 1, 1) - 0.5) * 20.0
        base = np.broadcast_to(ramp[None, :, None], (height, width, 3))
        shifted = np.roll(base, index * 3, axis=1)
        return np.clip(shifted + frame_brightness(index, num_frames), 0, 255).astype(np.uint8)
    shifted = np.roll(np.asarray(image, dtype=np.uint8), index, axis=1)
    if shifted.shape[:2] != (height, width):
        raise ValueError(f"image shape {shifted.shape[:2]} does not match size (h={height}, w={width})")
    return shifted


def _audio_samples(seconds: float, kind: str, tone_hz: float, rate: int) -> np.ndarray:
    n = int(round(seconds * rate))
    if kind == "silent":
        return np.zeros(n, dtype=np.float32)
    if kind == "tone":
        t = np.arange(n, dtype=np.float64) / rate
        return (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
    raise ValueError(f"audio must be 'tone', 'silent' or None, got {kind!r}")


def _encode_audio(container: av.container.OutputContainer, samples: np.ndarray) -> None:
    stream = container.add_stream("aac", rate=AUDIO_RATE, layout="mono")
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, len(samples), frame_size):
        chunk = samples[start : start + frame_size]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = start
        frame.time_base = Fraction(1, AUDIO_RATE)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_clip(
    path: str | Path,
    seconds: float = 1.0,
    fps: int = 10,
    size: tuple[int, int] = (96, 64),
    audio: str | None = "tone",
    image: np.ndarray | None = None,
    tone_hz: float = 440.0,
    bframes: int = 0,
) -> Path:
    """Write an H.264/yuv420p MP4 of ``round(seconds*fps)`` frames; ``size`` is (width, height).

    ``bframes`` > 0: up to that many B-frames in a row, none of them a reference (as
    camera and x264-default files have), so a decoder may skip them.

    ``audio``: 'tone' (0.5-amplitude sine), 'silent' (zeros) or None (no audio stream);
    audio is AAC, 16 kHz mono.  The moov atom is written first (faststart) so a
    truncated copy still opens and exercises the decode-error path.
    """
    path = Path(path)
    num_frames = max(1, int(round(seconds * fps)))
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        # ultrafast: no B-frames/lookahead, so encoding a tiny clip takes milliseconds.
        video.options = {"preset": "ultrafast", "crf": "18"}
        if bframes:
            video.options = {**video.options, "x264-params": f"bframes={bframes}:b-pyramid=none:b-adapt=0"}
        if audio is not None:
            _encode_audio(container, _audio_samples(num_frames / fps, audio, tone_hz, AUDIO_RATE))
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_pattern(index, num_frames, size, image), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


def write_raw_h264(path: str | Path, num_frames: int = 10, size: tuple[int, int] = (96, 64)) -> Path:
    """Write a raw H.264 elementary stream (``.h264``): no container, so no duration metadata."""
    path = Path(path)
    with av.open(str(path), mode="w", format="h264") as container:
        video = container.add_stream("libx264", rate=10)
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.options = {"preset": "ultrafast", "crf": "18"}
        for index in range(num_frames):
            frame = av.VideoFrame.from_ndarray(_pattern(index, num_frames, size, None), format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, 10)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
    return path


def write_wav(
    path: str | Path,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    tone_hz: float = 440.0,
    channels: int = 1,
) -> Path:
    """Write a PCM s16 WAV of a 0.5-amplitude sine (``channels`` identical channels)."""
    import soundfile as sf

    path = Path(path)
    mono = _audio_samples(seconds, "tone", tone_hz, sample_rate)
    data = np.repeat(mono[:, None], channels, axis=1) if channels > 1 else mono
    sf.write(str(path), data, sample_rate, subtype="PCM_16")
    return path


def write_ogg_video(path: str | Path, num_frames: int = 5, size: tuple[int, int] = (64, 48)) -> Path:
    """Write VP8 video in an Ogg container (no sound) under ``path``, e.g. ``film.ogg``: an .ogg
    that holds pictures, where most .ogg files hold Vorbis or Opus sound."""
    path = Path(path)
    width, height = size
    with av.open(str(path), "w", format="ogg") as out:
        stream = out.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * i % 256, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_ogg_sound(path: str | Path, seconds: float = 1.0, sample_rate: int = 16000) -> Path:
    """Write a Vorbis tone in an Ogg container under ``path``."""
    import soundfile as sf

    path = Path(path)
    sf.write(str(path), _audio_samples(seconds, "tone", 300.0, sample_rate), sample_rate, format="OGG",
             subtype="VORBIS")
    return path


def write_corrupt(path: str | Path, size: int = 4096, seed: int = 0) -> Path:
    """Write ``size`` seeded random bytes under a media-looking name (e.g. ``.mp4``)."""
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_truncated(src: str | Path, dst: str | Path, keep_fraction: float = 0.3) -> Path:
    """Copy only the first ``keep_fraction`` of ``src``'s bytes to ``dst``."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.write_bytes(data[: max(1, int(len(data) * keep_fraction))])
    return dst


def write_empty(path: str | Path) -> Path:
    """Write a zero-byte file."""
    path = Path(path)
    path.write_bytes(b"")
    return path

"""In-process media decoding with PyAV (bundled FFmpeg; no system ``ffmpeg`` binary).

Every failure surfaces as :class:`MediaError` (or a subclass) whose message names the
file, the reason and, where one exists, a fix; raw PyAV/OS exceptions never escape.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np

from pipeline.data.lengths import cut_off, declared_length_s

log = logging.getLogger(__name__)

# PyAV 18 raises av.error.FFmpegError subclasses (some also subclass OSError/ValueError/
# EOFError); OSError covers unreadable files; plain ValueError comes from PyAV's
# Python-level checks (e.g. a resampler fed a frame whose format changed mid-stream).
_DECODE_ERRORS = (av.error.FFmpegError, OSError, ValueError)
_CORRUPT_HINT = "the file may be truncated or not a media file; re-download or re-extract it"

# Seconds each thread has spent decoding media, so the extraction engine can tell decoding
# apart from the rest of an extractor's CPU preparation (face detection, resizing, ...).
_decode_clock = threading.local()


# FFmpeg threads per video decoder, per calling thread (0: FFmpeg's choice, a thread per core).
# The extraction engine sets it in each of its decode threads: N decoders at once each
# starting a thread per core oversubscribed a 16-core machine (8 workers: 136 threads).
_decoder = threading.local()


def set_decoder_threads(count: int) -> None:
    """FFmpeg threads that video decoders opened by the calling thread use; 0: FFmpeg's choice."""
    if count < 0:
        raise ValueError(f"decoder threads must be >= 0, got {count}")
    _decoder.threads = count


def _reformatter() -> av.video.reformatter.VideoReformatter:
    """The calling thread's frame converter. PyAV's `to_ndarray` builds a new scaler context
    per frame (0.7 of the 0.9 ms a 320x240 frame took); a reused one keeps it cached and
    gives the same pixels. One per thread: a converter is not thread-safe."""
    if not hasattr(_decoder, "reformatter"):
        _decoder.reformatter = av.video.reformatter.VideoReformatter()
    return _decoder.reformatter


def decoder_threads() -> int:
    """The calling thread's setting of `set_decoder_threads` (0 when unset)."""
    return getattr(_decoder, "threads", 0)


def decode_seconds() -> float:
    """Seconds the calling thread has spent in `sample_frames` and `load_audio` so far."""
    return getattr(_decode_clock, "seconds", 0.0)


def _clocked(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _decode_clock.seconds = decode_seconds() + time.perf_counter() - start
    return wrapper


class MediaError(Exception):
    """A media file is missing, unreadable, corrupt or lacks what was asked of it."""

    def __init__(self, path: str | os.PathLike[str], reason: str, hint: str | None = None) -> None:
        self.path, self.reason, self.hint = os.fspath(path), reason, hint
        message = f"{self.path}: {reason}"
        super().__init__(f"{message} (hint: {hint})" if hint else message)

    def __reduce__(self):  # keep picklable across worker processes despite the custom __init__
        return (type(self), (self.path, self.reason, self.hint))


class NoAudioError(MediaError):
    """The file has no audio stream."""


class NoVideoError(MediaError):
    """The file has no video stream."""


@dataclass(frozen=True)
class MediaInfo:
    """Container/stream metadata; video fields are 0 without video, sample_rate 0 without audio."""

    path: str
    duration_s: float
    has_video: bool
    has_audio: bool
    width: int
    height: int
    fps: float
    sample_rate: int


@dataclass(frozen=True)
class Frames:
    """Sampled frames: ``images`` (N, H, W, 3) uint8 RGB and their ``timestamps_s`` (N,) float64."""

    images: np.ndarray
    timestamps_s: np.ndarray


def _check_file(path: str | os.PathLike[str]) -> str:
    """Reject missing/empty paths up front: FFmpeg's own errors for these are cryptic."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MediaError(path, "file does not exist", "check the manifest path or fetch the data (dvc pull)")
    if not os.path.isfile(path):
        raise MediaError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty (0 bytes)", "re-download or re-extract it")
    return path


@contextlib.contextmanager
def _open(path: str | os.PathLike[str]) -> Iterator[av.container.InputContainer]:
    """Open ``path`` for reading; translate any av/OS error raised inside the block."""
    path = _check_file(path)
    try:
        with av.open(path, mode="r", metadata_errors="ignore") as container:
            yield container
    except _DECODE_ERRORS as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise MediaError(path, f"cannot decode ({type(exc).__name__}: {reason})", _CORRUPT_HINT) from exc


def _fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else 0.0


def _start_s(stream: av.stream.Stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _metadata_duration_s(container: av.container.InputContainer, stream: av.stream.Stream) -> float | None:
    """Stream duration, else container duration; None when the file does not say."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and container.duration > 0:
        return container.duration / av.time_base
    return None


def _packet_end_s(stream: av.stream.Stream, packet: av.Packet) -> float:  # its own duration included
    return float((packet.pts + (packet.duration or 0)) * stream.time_base)


def _scanned_duration_s(path: str, stream_index: int) -> float:
    """Duration by demuxing (not decoding) every packet: packet end times, else count / fps."""
    with _open(path) as container:
        stream = container.streams[stream_index]
        end, count = 0.0, 0
        for packet in container.demux(stream):
            if packet.size == 0:  # demuxer's flush packet
                continue
            count += 1
            if packet.pts is not None:
                end = max(end, _packet_end_s(stream, packet))
        if end > 0:
            return end - _start_s(stream)
        fps = _fps(stream) if stream.type == "video" else 0.0
        return count / fps if fps else float(count)


def _refuse_if_cut_off(path: str, what: str, decoded_s: float, declared_s: float | None) -> None:
    """Features of a third of a clip must not pass for the clip's (the extract stages record the
    MediaError as a failure and go on): pipeline/data/lengths.py."""
    if (reason := cut_off(what, decoded_s, declared_s)) is not None:
        raise MediaError(path, reason, _CORRUPT_HINT)


def _duration_s(path: str, container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    duration = _metadata_duration_s(container, stream)
    return duration if duration is not None else _scanned_duration_s(path, stream.index)


def probe(path: str | os.PathLike[str]) -> MediaInfo:
    """Read metadata of ``path``; raises MediaError on missing/empty/corrupt files or no streams."""
    path = os.fspath(path)
    with _open(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        audio = container.streams.audio[0] if container.streams.audio else None
        if video is None and audio is None:
            raise MediaError(path, "no audio or video stream", _CORRUPT_HINT)
        return MediaInfo(
            path=path,
            duration_s=_duration_s(path, container, video or audio),
            has_video=video is not None,
            has_audio=audio is not None,
            width=video.codec_context.width if video else 0,
            height=video.codec_context.height if video else 0,
            fps=_fps(video) if video else 0.0,
            sample_rate=(audio.codec_context.sample_rate or 0) if audio else 0,
        )


def _out_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) scaled down so the longer side is <= max_side; never upscales."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


_BUFFERED_BYTES = 512 << 20  # a clip's compressed packets are held while its frames are picked


def _pick_frames(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, targets: np.ndarray
) -> tuple[list[tuple[av.VideoFrame, float]], float | None]:
    """For each target time, the frame on screen then (last with pts <= target), and where the
    stream's packets end (seconds from its start; None when not read: files decoded in sequence).

    Targets before the first frame get the first frame; targets after the stream ends get
    the last one, so exactly len(targets) picks come back (repeats when frames are scarce).
    Frames no other frame refers to are not decoded unless picked (`_decode_picked`), which
    holds the compressed stream in memory: files over `_BUFFERED_BYTES` decode every frame.
    """
    if container.size > _BUFFERED_BYTES:
        return _pick_in_sequence(stream, container.decode(stream), targets), None
    demuxed = list(container.demux(stream))
    # the last frame's own duration counts: a frame held on screen to the end is not a cut
    ends = [_packet_end_s(stream, p) for p in demuxed if p.pts is not None]
    end = max(ends) - _start_s(stream) if ends else None
    packets = [packet for packet in demuxed if packet.size]  # size 0: flush (or an AVI's repeated frame)
    picked = _decode_picked(stream, packets, targets)
    if picked is not None:
        return picked, end
    # Packets without (distinct) timestamps, or picks the decoder did not return: decode
    # every frame from the start again, as a player would.
    codec = stream.codec_context
    codec.flush_buffers()
    codec.skip_frame = "DEFAULT"
    return _pick_in_sequence(stream, (f for p in packets + [None] for f in codec.decode(p)), targets), end


def _decode_picked(stream: av.video.stream.VideoStream, packets: list[av.Packet],
                   targets: np.ndarray) -> list[tuple[av.VideoFrame, float]] | None:
    """The picks, decoding only the picked frames and those others refer to; None if unsure.

    Packet timestamps tell which frame each target gets before anything is decoded; the
    decoder then skips non-reference frames (H.264/HEVC B-frames nothing predicts from) that
    no target needs: 30-50 % of an x264 clip's frames, and the picks are bit-identical
    because no kept frame depends on a skipped one. Codecs without the notion ignore it.
    """
    shown = sorted({p.pts for p in packets if p.pts is not None})
    if not packets or len(shown) != len(packets):  # missing or repeated timestamps
        return None
    times = np.array([float(pts * stream.time_base) for pts in shown])
    index = np.maximum(np.searchsorted(times, targets, side="right") - 1, 0)
    wanted = {shown[i] for i in index}
    codec, frames = stream.codec_context, {}
    for packet in packets + [None]:
        codec.skip_frame = "DEFAULT" if packet is None or packet.pts in wanted else "NONREF"
        for frame in codec.decode(packet):
            if frame.pts in wanted:
                frames[frame.pts] = frame
        if len(frames) == len(wanted):
            return [(frames[shown[i]], float(times[i])) for i in index]
    return None


def _pick_in_sequence(stream: av.video.stream.VideoStream, decoded: Iterator[av.VideoFrame],
                      targets: np.ndarray) -> list[tuple[av.VideoFrame, float]]:
    """`_pick_frames` over every decoded frame in order; frames without pts get a time from
    their position (rare, broken muxers)."""
    fps, start = _fps(stream), _start_s(stream)
    picks: list[tuple[av.VideoFrame, float]] = []
    held: tuple[av.VideoFrame, float] | None = None
    for index, frame in enumerate(decoded):
        # pts on the stream's clock: frames the decoder flushes out at the end carry no time base
        t = float(frame.pts * stream.time_base) if frame.pts is not None else start + index / (fps or 1.0)
        while len(picks) < len(targets) and targets[len(picks)] < t:
            picks.append(held or (frame, t))
        if len(picks) == len(targets):
            return picks
        held = (frame, t)
    if held is None:
        return picks
    return picks + [held] * (len(targets) - len(picks))


@_clocked
def sample_frames(path: str | os.PathLike[str], num_frames: int, max_side: int | None = None) -> Frames:
    """Sample ``num_frames`` RGB frames uniformly over the clip (targets at segment centres).

    Each target gets the frame displayed at that instant. A clip with fewer decodable
    frames than ``num_frames`` yields repeated frames, so exactly ``num_frames`` come back.
    ``max_side`` downsizes (keeping aspect) so that max(H, W) <= max_side. A file whose
    frames end well short of the length its header states raises MediaError ("truncated").
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.video:
            raise NoVideoError(path, "no video stream", "use load_audio for audio-only files")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threading: order is kept, decoding is faster
        if threads := decoder_threads():
            stream.codec_context.thread_count = threads
        duration = _duration_s(path, container, stream)
        targets = _start_s(stream) + (np.arange(num_frames) + 0.5) * duration / num_frames
        picks, end = _pick_frames(container, stream, targets)
        if not picks:
            raise MediaError(path, "no video frame could be decoded", _CORRUPT_HINT)
        if end is not None:  # where the packets end, against the header: a cut-off file is refused
            _refuse_if_cut_off(path, "video", end, declared_length_s(container, stream))
            _warn_if_short(path, end, duration, duration, _fps(stream))
        else:  # decoded in sequence: the last pick is all that is known (a frame held long reads short)
            _warn_if_short(path, picks[-1][1], targets[-1], duration, _fps(stream))
        # Convert inside the block (decoder still alive); one conversion per distinct frame.
        width, height = _out_size(picks[0][0].width, picks[0][0].height, max_side)
        converted: dict[int, np.ndarray] = {}
        reformatter = _reformatter()
        for frame, _ in picks:
            if id(frame) not in converted:
                converted[id(frame)] = reformatter.reformat(
                    frame, format="rgb24", width=width, height=height, interpolation="AREA"
                ).to_ndarray()
        images = np.stack([converted[id(frame)] for frame, _ in picks])
    return Frames(images=images, timestamps_s=np.array([t for _, t in picks], dtype=np.float64))


def _warn_if_short(path: str, last_t: float, last_target: float, duration: float, fps: float) -> None:
    """Decoded video ending well before the metadata duration, in a file whose header states no
    length (one that states it was refused above): likely truncation, so it is logged."""
    slack = max(2.0 / fps if fps else 0.0, 0.1 * duration)
    if last_target > last_t + slack:
        log.warning("%s: video decodes only to %.2fs of %.2fs; repeating the last frame", path, last_t, duration)


@_clocked
def load_audio(path: str | os.PathLike[str], sample_rate: int = 16000) -> np.ndarray:
    """Decode the first audio stream to float32 mono at ``sample_rate`` (1-D, in [-1, 1]).

    In-process equivalent of ``ffmpeg -ar 16000 -ac 1`` (the MER2025 baseline). A silent
    track yields zeros; a file without an audio stream raises NoAudioError; a file cut off
    well short of the length its header states raises MediaError ("truncated").
    """
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.audio:
            raise NoAudioError(path, "no audio stream", "pass the clip's separate .wav, or skip audio for it")
        # rematrix_maxval=1 normalises the down-mix like ffmpeg does for s16 output
        # (stereo -> 0.5*(L+R)); float output would otherwise use 0.707*(L+R) and can clip.
        resampler = av.AudioResampler(
            format="flt", layout="mono", rate=sample_rate, options={"rematrix_maxval": "1.0"}
        )
        chunks: list[np.ndarray] = []  # streamed: one small array per frame, one concat at the end
        stream, end = container.streams.audio[0], None
        for packet in container.demux(stream):
            if packet.pts is not None and packet.size:  # where the packets end: a timestamp gap is no cut
                end = max(end or 0.0, _packet_end_s(stream, packet))
            for frame in packet.decode():
                chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))  # flush
        declared = declared_length_s(container, stream)
        reached = end - _start_s(stream) if end is not None else None
    if not chunks:
        raise MediaError(path, "audio stream decoded to 0 samples", _CORRUPT_HINT)
    wav = np.concatenate(chunks).astype(np.float32, copy=False)
    if reached is not None:
        _refuse_if_cut_off(path, "audio", reached, declared)
    return np.clip(wav, -1.0, 1.0, out=wav)


def clip_audio(wav_path: str | None, video_path: str | None, sample_rate: int = 16000) -> np.ndarray:
    """A clip's audio: from ``wav_path`` when given (non-empty), else decoded from ``video_path``.

    A given-but-missing wav raises MediaError rather than silently falling back to the video.
    """
    if wav_path:
        return load_audio(wav_path, sample_rate)
    if video_path:
        return load_audio(video_path, sample_rate)
    raise MediaError("<no path>", "clip_audio got neither a wav_path nor a video_path", "fix the manifest row")

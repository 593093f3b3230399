import json
from pathlib import Path

import numpy as np
import pytest
from conftest import build_dataset, write_csv

from pipeline.config import IngestConfig
from pipeline.data.ingest import IngestError, ingest, summarize
from pipeline.manifest import read_manifest, write_manifest
from pipeline.stages.ingest import main as ingest_main


def test_manifest_records_media_text_labels(ingest_cfg, tmp_path):
    clips = ingest(ingest_cfg)
    assert [c.name for c in clips] == sorted(c.name for c in clips)
    by_name = {c.name: c for c in clips}
    assert by_name["sample_00000001"].label == "angry"
    assert by_name["sample_00000001"].split == "labelled"
    assert by_name["sample_00000001"].valence == 0.5
    assert by_name["sample_00000100"].split == "unlabelled"
    assert by_name["sample_00000100"].candidate and by_name["sample_00000100"].label is None
    assert all(c.has_video and c.has_text and c.audio is None for c in clips)
    summary = summarize(clips)
    assert summary["labelled"] == 6 and summary["unlabelled"] == 2 and summary["candidates"] == 2


def test_unicode_commas_quotes_newlines_round_trip(ingest_cfg, tmp_path):
    clips = ingest(ingest_cfg)
    path = tmp_path / "m.jsonl"
    write_manifest(clips, path)
    again = read_manifest(path)
    assert again == clips
    assert again[0].english == 'He said "hi, sample_00000000"\nthen left.'
    assert again[0].chinese == "你好，sample_00000000"


def test_unicode_clip_names(tmp_path):
    root = build_dataset(tmp_path / "u", {"片段_é01": "happy"}, ["clip, with comma"])
    names = [c.name for c in ingest(IngestConfig(root=str(root)))]
    assert names == sorted(["片段_é01", "clip, with comma"])


def test_audio_only_dataset(tmp_path):
    from fixtures_media import write_wav

    root = tmp_path / "audio_only"
    (root / "audio").mkdir(parents=True)
    write_wav(root / "audio" / "a.wav", seconds=0.3)
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"], [["a", "sad", ""]])
    (clip,) = ingest(IngestConfig(root=str(root)))
    assert clip.audio.endswith("a.wav") and clip.video is None and not clip.has_text
    assert clip.valence is None and clip.has_audio


def test_other_containers_are_read_and_unread_files_are_named(tmp_path, engine, caplog):
    """CREMA-D ships .flv videos, many speech corpora .mp3 / .ogg audio: ingest reads them, and the
    prosody store decodes each; a file of a suffix ingest does not read, and a second file of the
    same clip name, are named in a warning instead of being dropped without a word."""
    import soundfile as sf
    from fixtures_media import _audio_samples, write_clip

    from pipeline.config import ExtractorSpec
    from pipeline.extract.engine import run_extraction
    from pipeline.store import StoreReader

    root = tmp_path / "ds"
    (root / "video").mkdir(parents=True)
    (root / "audio").mkdir()
    write_clip(root / "video" / "a.flv", seconds=1.0, fps=4, size=(48, 32), tone_hz=200.0)
    write_clip(root / "video" / "a.3gp", seconds=1.0, fps=4, size=(48, 32))  # a twin, sorted first: .flv ranks first
    (root / "video" / "notes.txt").write_text("not a clip")
    (root / "video" / ".DS_Store").write_bytes(b"\0")  # hidden: not worth a word
    tone = _audio_samples(1.0, "tone", 300.0, 16000)
    sf.write(root / "audio" / "b.mp3", tone, 16000, format="MP3")
    sf.write(root / "audio" / "c.ogg", tone, 16000, format="OGG", subtype="VORBIS")
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [["a", "happy", ""], ["b", "sad", ""], ["c", "angry", ""]])
    with caplog.at_level("WARNING"):
        clips = ingest(IngestConfig(root=str(root)))
    assert [(c.name, Path(c.video or c.audio).name) for c in clips] == [("a", "a.flv"), ("b", "b.mp3"),
                                                                      ("c", "c.ogg")]
    warned = [r.getMessage() for r in caplog.records]
    assert any("1 file(s) not read, by suffix {'.txt': 1}" in m for m in warned)
    assert any("1 file(s) share a clip name with another file and are not read: a.3gp" in m for m in warned)
    assert not any("DS_Store" in m for m in warned)
    write_manifest(clips, tmp_path / "m.jsonl")
    summary = run_extraction("prosody", ExtractorSpec("numpy_prosody", {}), engine, tmp_path / "m.jsonl",
                             tmp_path / "p.h5", progress=False)
    assert (summary.done, summary.failed) == (3, 0)
    with StoreReader(tmp_path / "p.h5") as reader:
        values, present = reader.read("utterance", ["a", "b", "c"])
    assert present.all() and np.isfinite(values).all()


def test_a_clip_with_two_files_is_read_from_the_layouts_own_suffix(tmp_path):
    """x.mp4 beside a converted x.3gp (sorted first): the .mp4 is read; a clip named `news.ts` (its file
    news.ts.mp4) is a clip, not a file name, though `news` has media too."""
    from fixtures_media import write_clip

    root = tmp_path / "ds"
    (root / "video").mkdir(parents=True)
    for name in ("x.3gp", "x.mp4", "news.mp4", "news.ts.mp4"):
        write_clip(root / "video" / name, seconds=0.3, fps=4, size=(32, 32))
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [["x", "happy", ""], ["news", "sad", ""], ["news.ts", "angry", ""]])
    clips = {c.name: Path(c.video).name for c in ingest(IngestConfig(root=str(root)))}
    assert clips == {"x": "x.mp4", "news": "news.mp4", "news.ts": "news.ts.mp4"}


def test_a_file_name_in_place_of_a_clip_name_is_refused(dataset):
    """`sample_00000100.mp4` in the candidates file would be a clip of its own, answered by the prior
    under a name nobody scores, while the real clip went unsubmitted."""
    path = dataset / "track_all_candidates.csv"
    path.write_text(path.read_text().replace("sample_00000100", "sample_00000100.mp4"))
    with pytest.raises(IngestError, match=r"track_all_candidates.csv, line 2: 'sample_00000100.mp4' is a file "
                                          r"name; .* Fix: write 'sample_00000100'"):
        ingest(IngestConfig(root=str(dataset)))


def test_text_only_dataset(tmp_path):
    root = build_dataset(tmp_path / "t", {"a": "happy", "b": "sad"}, ["c"], video=False)
    clips = ingest(IngestConfig(root=str(root)))
    assert len(clips) == 3 and not any(c.has_audio for c in clips)
    assert all(c.has_text for c in clips)


def test_no_subtitles(tmp_path):
    root = build_dataset(tmp_path / "n", {"a": "happy"}, ["b"], subtitles=False)
    clips = ingest(IngestConfig(root=str(root)))
    assert [c.has_text for c in clips] == [False, False]


def test_label_outside_six_classes_names_file_row_and_fix(dataset):
    path = dataset / "track1_train_disdim.csv"
    text = path.read_text(encoding="utf-8").replace("worried", "disgust")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(IngestError) as err:
        ingest(IngestConfig(root=str(dataset)))
    message = str(err.value)
    assert "track1_train_disdim.csv" in message and "line 6" in message
    assert "'disgust'" in message and "Fix" in message


def test_duplicate_clip_name(dataset):
    path = dataset / "track1_train_disdim.csv"
    with path.open("a", encoding="utf-8") as fh:
        fh.write("sample_00000002,sad,0\n")
    with pytest.raises(IngestError, match=r"line 8: duplicate clip name 'sample_00000002' \(first on line 4\)"):
        ingest(IngestConfig(root=str(dataset)))


def test_label_row_without_media_or_subtitle(dataset):
    with (dataset / "track1_train_disdim.csv").open("a", encoding="utf-8") as fh:
        fh.write("ghost,happy,0\n")
    with pytest.raises(IngestError, match="'ghost' has no media and no subtitle"):
        ingest(IngestConfig(root=str(dataset)))


def test_missing_root_names_params_key(tmp_path):
    with pytest.raises(IngestError, match="ingest.root"):
        ingest(IngestConfig(root=str(tmp_path / "nope")))


def test_bad_header_names_columns(dataset):
    write_csv(dataset / "track1_train_disdim.csv", ["clip", "emotion"], [["sample_00000000", "sad"]])
    with pytest.raises(IngestError, match="missing column"):
        ingest(IngestConfig(root=str(dataset)))


def test_stage_writes_manifest_and_metrics(dataset, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  root: {dataset}\n", encoding="utf-8")
    ingest_main([str(tmp_path / "m.jsonl"), str(tmp_path / "s.json"), "--params", str(params)])
    assert len(read_manifest(tmp_path / "m.jsonl")) == 8
    assert json.loads((tmp_path / "s.json").read_text())["labels"]["angry"] == 1


def test_stage_media_manifest_holds_no_labels_and_changes_with_a_replaced_clip(dataset, tmp_path):
    """data/media.jsonl, what the extract stages depend on: the clips with something to extract, in
    manifest order, with no label, group or split; the same bytes after a relabel or a new
    content-free candidate; a new line for a clip whose file was replaced under the same name,
    even at the same size (the paths alone would hide it)."""
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  root: {dataset}\n", encoding="utf-8")

    def run() -> tuple[list, bytes]:
        ingest_main([str(tmp_path / "m.jsonl"), "--media", str(tmp_path / "media.jsonl"), "--params", str(params)])
        return read_manifest(tmp_path / "m.jsonl"), (tmp_path / "media.jsonl").read_bytes()

    clips, media = run()
    bare = read_manifest(tmp_path / "media.jsonl")
    assert [c.name for c in bare] == [c.name for c in clips] and [c.video for c in bare] == [c.video for c in clips]
    assert all(c.label is None and c.group is None and not c.candidate and c.split == "unlabelled" for c in bare)
    assert len({c.media_digest for c in bare}) == len(bare) and all(c.media_digest is None for c in clips)
    assert any(c.label for c in clips)

    labels = dataset / "track1_train_disdim.csv"
    labels.write_text(labels.read_text(encoding="utf-8").replace("angry", "sad"), encoding="utf-8")
    with (dataset / "track_all_candidates.csv").open("a", encoding="utf-8") as fh:
        fh.write("listed_only\n")  # a candidate with nothing to extract: the prior answers it
    relabelled, same = run()
    assert same == media and [c.label for c in relabelled] != [c.label for c in clips]
    assert "listed_only" in {c.name for c in relabelled}

    video = Path(bare[0].video)
    data = bytearray(video.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a replaced file, same name and size (the test clips are under 64 KiB)
    video.write_bytes(bytes(data))
    _, changed = run()
    old, new = media.decode().splitlines(), changed.decode().splitlines()
    assert old[0] != new[0] and old[1:] == new[1:]


def test_stage_error_is_one_line_and_exit_1(dataset, tmp_path, capsys):
    (dataset / "track1_train_disdim.csv").write_text("name,discrete\nsample_00000000,joy\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  root: {dataset}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        ingest_main([str(tmp_path / "m.jsonl"), "--params", str(params)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'joy'" in err and "Traceback" not in err
    assert not (tmp_path / "m.jsonl").exists()


def test_candidates_without_content_are_kept_and_counted(dataset):
    """The organisers score every candidate: one with an empty subtitle and no media, or listed
    nowhere else, stays in the manifest (it gets the training prior); an unlabelled
    non-candidate with nothing to read is dropped."""
    from pipeline.data.ingest import summarize

    with (dataset / "track_all_candidates.csv").open("a", encoding="utf-8") as fh:
        fh.write("empty_sub\nlisted_only\n")
    with (dataset / "subtitle_chieng.csv").open("a", encoding="utf-8") as fh:
        fh.write("empty_sub,,\nnot_a_candidate,, \n")
    clips = {c.name: c for c in ingest(IngestConfig(root=str(dataset)))}
    assert clips["empty_sub"].candidate and clips["listed_only"].candidate
    assert not clips["empty_sub"].has_text and clips["empty_sub"].video is None
    assert "not_a_candidate" not in clips
    summary = summarize(list(clips.values()))
    assert summary["candidates_without_content"] == 2 and summary["candidates"] == 4


def test_an_ogg_in_the_video_folder_is_read_when_it_holds_pictures(tmp_path, caplog):
    """Most .ogg files hold sound, some VP8 or Theora video: in video/ the container decides (a
    sound-only one is named, with the fix); in audio/ an .ogg is sound without being opened."""
    from fixtures_media import write_ogg_sound, write_ogg_video

    root = tmp_path / "ds"
    (root / "video").mkdir(parents=True)
    (root / "audio").mkdir()
    write_ogg_video(root / "video" / "film.ogg")
    write_ogg_sound(root / "video" / "voice.ogg")
    write_ogg_sound(root / "audio" / "song.ogg")
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"],
              [["film", "happy", ""], ["song", "sad", ""]])
    with caplog.at_level("WARNING"):
        clips = ingest(IngestConfig(root=str(root)))
    assert [(c.name, c.video and Path(c.video).name, c.audio and Path(c.audio).name) for c in clips] == [
        ("film", "film.ogg", None), ("song", None, "song.ogg")]
    warned = [r.getMessage() for r in caplog.records]
    assert any("1 .ogg file(s) hold no video stream" in m and "voice.ogg" in m and "'ingest.audio_dir'" in m
               for m in warned), warned


def test_a_group_cell_of_spaces_names_no_speaker(tmp_path):
    """`b, sad, , ` (a blank group): no group, and the subtitle row's group is read instead; it was a
    group "" shared by every such clip."""
    root = tmp_path / "ds"
    root.mkdir()
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence", "group"],
              [["a", "sad", "", "  "], ["b", "happy", "", " "], ["c", "angry", "", " s2 "]])
    write_csv(root / "subtitle_chieng.csv", ["name", "chinese", "english", "group"],
              [["a", "", "hi", "s1"], ["b", "", "yo", ""], ["c", "", "no", "s9"]])
    clips = ingest(IngestConfig(root=str(root)))
    assert [(c.name, c.group) for c in clips] == [("a", "s1"), ("b", None), ("c", "s2")]

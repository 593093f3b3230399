import csv

import numpy as np
import pytest
from conftest import write_csv
from fixtures_media import write_wav

from pipeline.data import convert
from pipeline.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.splits import fold_groups, fold_indices


def _ravdess_tree(root):
    (root / "Actor_01").mkdir(parents=True)
    (root / "Actor_02").mkdir()
    names = ["03-01-01-01-01-01-01", "03-01-02-01-02-01-01", "03-01-07-01-01-01-01",  # neutral, calm, disgust
             "03-01-05-02-01-01-02", "03-01-08-01-02-02-02", "02-01-03-01-01-01-02"]  # angry, surprise, video-only
    for name in names:
        write_wav(root / f"Actor_{name[-2:]}" / f"{name}.wav", seconds=0.2)
    (root / "Actor_01" / "notes.txt").write_text("not media")
    return root


def test_ravdess_maps_drops_and_keeps_actor(tmp_path):
    items, report = convert.ravdess(_ravdess_tree(tmp_path / "rav"))
    assert {i.name: i.label for i in items} == {
        "03-01-01-01-01-01-01": "neutral", "03-01-02-01-02-01-01": "neutral",
        "03-01-05-02-01-01-02": "angry", "03-01-08-01-02-02-02": "surprise"}
    assert report.dropped == {"disgust: no MER class": 1, "video-only file (02-...): no audio": 1,
                              "not a RAVDESS media file name": 1}
    by_name = {i.name: i for i in items}
    assert by_name["03-01-02-01-02-01-01"].english == "Dogs are sitting by the door."
    assert by_name["03-01-05-02-01-01-02"].group == "actor_02"

    dst = convert.write_layout(items, tmp_path / "mer", report) and tmp_path / "mer"
    clips = ingest(IngestConfig(root=str(dst)))
    assert len(clips) == 4 and all(c.audio and c.group and c.label for c in clips)


def test_a_corpus_of_linked_folders_is_read_through_the_links(tmp_path):
    """A subset put together from links to the corpus's folders reads as the folders themselves (it
    read as "no files found"); a link back up the tree is walked once, not forever."""
    tree = _ravdess_tree(tmp_path / "rav")
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "Actor_02").symlink_to(tree / "Actor_02", target_is_directory=True)
    (subset / "Actor_02_again").symlink_to(subset, target_is_directory=True)  # a loop
    items, _ = convert.ravdess(subset)
    assert sorted(i.name for i in items) == ["03-01-05-02-01-01-02", "03-01-08-01-02-02-02"]
    assert all(i.media.is_file() for i in items)


def test_ravdess_calm_can_be_dropped(tmp_path):
    items, report = convert.ravdess(_ravdess_tree(tmp_path / "rav"), calm="drop")
    assert "03-01-02-01-02-01-01" not in {i.name for i in items}
    assert report.dropped["calm (dropped by --calm drop)"] == 1


def test_meld_text_only_with_quotes_commas_unicode(tmp_path):
    src = tmp_path / "meld"
    src.mkdir()
    header = ["Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID"]
    write_csv(src / "train_sent_emo.csv", header, [
        ["1", 'He said, "no way" — really…', "Ross", "joy", "positive", "3", "0"],
        ["2", "Ugh.", "Monica", "disgust", "negative", "3", "1"],
        ["3", "   ", "Joey", "anger", "negative", "4", "0"],
        ["4", "Wait, what?", "Rachel", "surprise", "positive", "4", "1"],
    ])
    items, report = convert.meld(src)
    assert [(i.name, i.label, i.group) for i in items] == [
        ("train_dia3_utt0", "happy", "train_dia3"), ("train_dia4_utt1", "surprise", "train_dia4")]
    assert report.dropped == {"disgust: no MER class": 1, "empty utterance": 1}
    convert.write_layout(items, tmp_path / "mer", report)
    clips = ingest(IngestConfig(root=str(tmp_path / "mer")))
    assert clips[0].english == 'He said, "no way" — really…' and not clips[0].has_audio


def test_folder_uses_the_given_label_map(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_wav(src / "a.wav", seconds=0.2)
    write_wav(src / "b.wav", seconds=0.2)
    labels = write_csv(tmp_path / "labels.csv", ["name", "label", "text"],
                       [["a", "Joyful", ""], ["b", "bored", ""], ["c", "joyful", "only text"], ["d", "joyful", ""]])
    mapping = write_csv(tmp_path / "map.csv", ["source", "mer"], [["joyful", "happy"], ["bored", "drop"]])
    items, report = convert.folder(src, labels, mapping)
    assert [(i.name, i.label) for i in items] == [("a", "happy"), ("c", "happy")]
    assert report.dropped == {"label 'bored' mapped to drop": 1, "no media file and no text": 1}

    write_csv(tmp_path / "labels2.csv", ["name", "label"], [["a", "angst"]])
    with pytest.raises(convert.ConvertError, match="'angst'.*add a row"):
        convert.folder(src, tmp_path / "labels2.csv", mapping)
    write_csv(tmp_path / "bad_map.csv", ["source", "mer"], [["joyful", "joy"]])
    with pytest.raises(convert.ConvertError, match="not MER classes"):
        convert.folder(src, labels, tmp_path / "bad_map.csv")


def test_an_ogg_video_is_written_as_ogv_and_ogg_sound_stays_audio(tmp_path):
    """`mer convert folder` with .ogg files: the container, not the suffix, says video or sound, so a
    VP8 clip keeps its pictures (video/x.ogv, the name ingest reads there) and Vorbis goes to audio/."""
    from fixtures_media import write_ogg_sound, write_ogg_video

    src = tmp_path / "src"
    src.mkdir()
    write_ogg_video(src / "film.ogg")
    write_ogg_sound(src / "voice.ogg")
    labels = write_csv(tmp_path / "labels.csv", ["name", "label"], [["film", "joy"], ["voice", "anger"]])
    mapping = write_csv(tmp_path / "map.csv", ["source", "mer"], [["joy", "happy"], ["anger", "angry"]])
    items, report = convert.folder(src, labels, mapping)
    convert.write_layout(items, tmp_path / "mer", report)
    assert sorted(str(p.relative_to(tmp_path / "mer")) for p in (tmp_path / "mer").rglob("*.og*")) == [
        "audio/voice.ogg", "video/film.ogv"]
    clips = ingest(IngestConfig(root=str(tmp_path / "mer")))
    assert [(c.name, c.label, bool(c.video), bool(c.audio)) for c in clips] == [
        ("film", "happy", True, False), ("voice", "angry", False, True)]


def test_no_half_dataset_on_error(tmp_path, monkeypatch):
    items, report = convert.ravdess(_ravdess_tree(tmp_path / "rav"))
    calls, original = [], convert.shutil.copyfile

    def failing_copy(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        return original(src, dst)

    monkeypatch.setattr(convert.shutil, "copyfile", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        convert.write_layout(items, tmp_path / "mer", report)
    assert not (tmp_path / "mer").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rav"]  # no temp folder left either


def test_refuses_to_overwrite(tmp_path):
    (tmp_path / "mer").mkdir()
    items, report = convert.ravdess(_ravdess_tree(tmp_path / "rav"))
    with pytest.raises(convert.ConvertError, match="already exists"):
        convert.write_layout(items, tmp_path / "mer", report)


def test_group_folds_never_split_a_group():
    rng = np.random.default_rng(0)
    groups = [f"actor_{i % 12}" for i in range(240)]
    labels = [str(x) for x in rng.integers(0, 6, 240)]
    folds = fold_indices(labels, groups, k=5, seed=1)
    seen_val = []
    for train, val in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        seen_val.extend(val)
    assert sorted(seen_val) == list(range(240))  # every clip validated exactly once


def test_folds_without_groups_are_stratified():
    labels = ["a"] * 50 + ["b"] * 50
    for train, val in fold_indices(labels, [None] * 100, k=5):
        assert sum(labels[i] == "a" for i in val) == 10


def test_fewer_groups_than_folds_hold_one_group_out_each():
    """2 speakers and k 5: two folds, each validating one speaker (it stopped the run); one speaker
    alone: the clips are split (stratified), as nothing else can be held out."""
    labels = ["a"] * 50 + ["b"] * 50
    groups = ["g1", "g2"] * 50
    folds = fold_indices(labels, groups, k=5)
    assert [sorted({groups[i] for i in val}) for _, val in folds] in (
        [["g1"], ["g2"]], [["g2"], ["g1"]])
    assert fold_groups(groups, 5) == 2 and fold_groups(["g"] * 100, 5) == 1 and fold_groups([None] * 3, 5) == 5
    one = fold_indices(labels, ["g"] * 100, k=5)
    assert len(one) == 5 and all(sum(labels[i] == "a" for i in val) == 10 for _, val in one)

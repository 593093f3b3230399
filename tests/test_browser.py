"""The error browser's data and files, without a browser: rows joined right, data escaped,
thumbnails written small and named safely, the DVC stages end to end on a tiny set."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_media import write_clip, write_corrupt
from pipeline.browser.page import render_page, script_json
from pipeline.browser.records import COLUMNS, SCALE, BrowserInputError, clip_rows, thumb_name
from pipeline.browser.thumbs import MAX_SIDE, write_thumbnails
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip, write_manifest
from pipeline.tables import write_jsonl

HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">&amp; \u2028 -->"


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def tiny_reports(tmp_path: Path) -> tuple[list[Clip], dict[str, Path]]:
    """Three clips as train and refine would report them: a labelled one (out of fold, refined,
    faces missing, a failure record), a labelled one answered by the prior, an unlabelled candidate."""
    clips = [Clip("a", chinese="你好", english=HOSTILE, label="sad", split="labelled"),
             Clip("b", label="angry", split="labelled"),
             Clip("c", english="hi", split="unlabelled", candidate=True)]
    probs = {"a": [0.1, 0.1, 0.1, 0.25, 0.4, 0.05], "b": [1 / 6] * 6, "c": [0.7, 0.1, 0.05, 0.05, 0.05, 0.05]}
    paths = {
        "proba": _csv(tmp_path / "proba.csv", ["name", "kind", "candidate", "no_modality", *EMOTIONS],
                      [["a", "labelled_oof", 0, 0, *probs["a"]], ["b", "prior_no_modality", 0, 1, *probs["b"]],
                       ["c", "unlabelled", 1, 0, *probs["c"]]]),
        "weights": _csv(tmp_path / "weights.csv", ["name", "faces", "prosody"],
                        [["a", "", 1.0], ["b", "", ""], ["c", 0.25, 0.75]]),
        "refined": tmp_path / "labels.jsonl",
        "features": tmp_path / "features",
    }
    write_jsonl(paths["refined"], [{"name": "a", "label": "sad", "refined": "worried", "changed": True, "dropped": False},
                                   {"name": "c", "label": None, "refined": "neutral", "changed": False, "pseudo": True}])
    paths["features"].mkdir()
    write_jsonl(paths["features"] / "faces.failures.jsonl",
                [{"id": "a", "stage": "extract.faces", "modality": "video", "kind": "unreadable_media", "error": "moov"}])
    return clips, paths


def test_rows_join_train_refine_and_failures(tmp_path):
    clips, p = tiny_reports(tmp_path)
    stores, rows = clip_rows(clips, p["proba"], p["weights"], p["refined"], p["features"], {"a": "thumbs/x.jpg"})
    assert stores == ["faces", "prosody"]
    a, b, c = (dict(zip(COLUMNS, row)) for row in rows)
    assert a["gold"] == EMOTIONS.index("sad") and a["refined"] == EMOTIONS.index("worried")
    assert a["loss"] == pytest.approx(-math.log(0.25), abs=1e-4)  # cross-entropy of the gold class
    assert a["confidence"] == 4000 and a["probs"][4] == 4000 and sum(a["probs"]) == SCALE
    assert a["weights"] == [None, SCALE] and a["missing"] == ["faces"]
    assert a["failures"] == [["extract.faces", "unreadable_media", "moov"]]
    assert a["thumb"] == "thumbs/x.jpg" and b["thumb"] is None
    assert a["english"] == HOSTILE  # kept as data; escaping is the page's job
    assert b["kind"] == "prior_no_modality" and b["loss"] is None and b["missing"] == ["faces", "prosody"]
    assert c["split"] == "unlabelled" and c["candidate"] == 1 and c["gold"] is None and c["refined"] is None
    assert c["weights"] == [2500, 7500] and c["missing"] == []


def test_rows_refuse_predictions_for_clips_the_manifest_lacks(tmp_path):
    clips, p = tiny_reports(tmp_path)
    with pytest.raises(BrowserInputError, match="manifest lacks"):
        clip_rows(clips[1:], p["proba"], p["weights"], p["refined"], p["features"], {})


def test_script_json_cannot_end_the_data_block():
    data = {"s": HOSTILE, "t": "</SCRIPT><!--"}
    text = script_json(data)
    assert not re.search(r"[<>&\u2028\u2029]", text)
    assert json.loads(text) == data


def test_page_embeds_hostile_text_only_as_escaped_data(tmp_path):
    clips, p = tiny_reports(tmp_path)
    stores, rows = clip_rows(clips, p["proba"], p["weights"], p["refined"], p["features"], {})
    page = render_page(stores, rows)
    assert page.count("<script") == 2  # the data block and the page's own script, nothing from the data
    assert "__pwned" in page and "<img src=x" not in page and "</script><img" not in page
    block = re.search(r'<script type="application/json" id="mer-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(block)["rows"][0][COLUMNS.index("english")] == HOSTILE
    csp = re.search(r'Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "http" not in csp


def test_thumbnails_are_small_middle_frames_named_by_digest(tmp_path):
    video = write_clip(tmp_path / "v.mp4", seconds=2.0, fps=10, size=(320, 240), audio=None)
    write_corrupt(tmp_path / "bad.mp4")
    import av
    from fixtures_media import AUDIO_RATE, _audio_samples, _encode_audio

    with av.open(str(tmp_path / "sound.mp4"), mode="w") as container:  # an MP4 with no picture at all
        _encode_audio(container, _audio_samples(0.5, "tone", 300.0, AUDIO_RATE))
    clips = [Clip("../evil<name>", video=str(video)), Clip("audio-only", audio="x.wav"),
             Clip("broken", video=str(tmp_path / "bad.mp4")), Clip("no-picture", video=str(tmp_path / "sound.mp4"))]
    counts = write_thumbnails(clips, tmp_path / "thumbs")
    assert counts == {"written": 1, "no_video": 2, "undecodable": 1}  # no picture is not "undecodable"
    files = list((tmp_path / "thumbs").iterdir())
    assert [f.name for f in files] == [thumb_name("../evil<name>")]
    assert re.fullmatch(r"[0-9a-f]{16}\.jpg", files[0].name)
    with Image.open(files[0]) as image:
        assert image.format == "JPEG" and max(image.size) == MAX_SIDE and image.size == (160, 120)
        # frame brightness encodes the index (fixtures_media): the middle of 20 frames is 9 or 10
        mean = float(np.asarray(image.convert("L")).mean())
    assert 30 + 190 * 8 / 19 < mean < 30 + 190 * 11 / 19
    assert files[0].stat().st_size < 8_000


def test_browser_stage_writes_the_page(tmp_path):
    from pipeline.stages.browser import main

    clips, p = tiny_reports(tmp_path)
    write_manifest(clips, tmp_path / "manifest.jsonl")
    (tmp_path / "out" / "thumbs").mkdir(parents=True)
    Image.new("RGB", (16, 9)).save(tmp_path / "out" / "thumbs" / thumb_name("c"))
    main([str(tmp_path / "manifest.jsonl"), str(tmp_path / "out" / "index.html"), "--proba", str(p["proba"]),
          "--weights", str(p["weights"]), "--refined", str(p["refined"]), "--thumbs", str(tmp_path / "out" / "thumbs"),
          "--features", str(p["features"])])
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    rows = json.loads(re.search(r'id="mer-data">(.*?)</script>', page, re.S).group(1))["rows"]
    assert [r[0] for r in rows] == ["a", "b", "c"]
    assert rows[2][COLUMNS.index("thumb")] == f"thumbs/{thumb_name('c')}"


@pytest.mark.parametrize("refined, in_folds, use", [(False, False, "unused"), (True, False, "trained"),
                                                    (True, True, "in_folds")])
def test_the_page_knows_whether_train_used_the_refined_labels(tmp_path, refined, in_folds, use):
    """A card said "flagged by refine (left out of training)" with train.use_refined off, when the clip
    trained on its gold label: the stage reads train's metrics.json, and the page says what happened."""
    from pipeline.stages.browser import main

    clips, p = tiny_reports(tmp_path)
    write_manifest(clips, tmp_path / "manifest.jsonl")
    (tmp_path / "thumbs").mkdir()
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"refined_labels": refined, "refined_in_folds": in_folds}))
    main([str(tmp_path / "manifest.jsonl"), str(tmp_path / "out" / "index.html"), "--proba", str(p["proba"]),
          "--weights", str(p["weights"]), "--refined", str(p["refined"]), "--thumbs", str(tmp_path / "thumbs"),
          "--features", str(p["features"]), "--metrics", str(metrics)])
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert json.loads(re.search(r'id="mer-data">(.*?)</script>', page, re.S).group(1))["refine_use"] == use
    metrics.write_text("{}")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "manifest.jsonl"), str(tmp_path / "out" / "index.html"), "--proba", str(p["proba"]),
              "--weights", str(p["weights"]), "--thumbs", str(tmp_path / "thumbs"), "--metrics", str(metrics)])

"""The pages a person opens, rendered in headless Chromium with the network emulated offline:
the error browser (a real click on a confusion cell filters the list, the URL hash pins a view,
paging and sorting follow the data, a hostile subtitle stays text) and the pages `dvc plots
show` / `dvc plots diff` write (no remote script, every chart drawn). Each test skips, saying
why, where there is no chromium (`make test` installs it when it can)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from headless import Browser, need_chromium, pixel_spread, save_artifact
from pipeline.bench.browser import STORES, synthetic_rows
from pipeline.browser.page import PAGE_SIZE, write_page
from pipeline.browser.records import COLUMNS, clip_row
from pipeline.labels import EMOTIONS
from pipeline.manifest import Clip

REPO = Path(__file__).resolve().parents[1]
HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> & done"
READY = "document.body.dataset.ready === '1'"
CARDS = "[...document.querySelectorAll('.card')].map(c => [c.dataset.name, c.dataset.gold, c.dataset.pred])"


def hostile_row() -> list:
    clip = Clip("<b>bold</b>", chinese="</script><!--", english=HOSTILE, label="sad", split="labelled")
    proba = {"kind": "labelled_oof", "candidate": "0", **{e: "0.1" for e in EMOTIONS[:5]}, "surprise": "0.5"}
    return clip_row(clip, proba, {s: "0.2" for s in STORES}, STORES, None, [], None)


@pytest.fixture
def page(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = synthetic_rows(120, seed=3) + [hostile_row()]
    path = tmp_path / "index.html"
    write_page(path, STORES, rows)
    clips = [dict(zip(COLUMNS, r)) for r in rows]
    for c in clips:
        c["pred"] = c["probs"].index(max(c["probs"]))
    return path, clips


def test_browser_renders_and_a_click_on_a_confusion_cell_filters(page):
    need_chromium()
    path, clips = page
    cells = Counter((c["gold"], c["pred"]) for c in clips if c["kind"] == "labelled_oof")
    (gold, pred), expected = max(((cell, n) for cell, n in cells.items() if cell[0] != cell[1]), key=lambda x: x[1])
    gold, pred = EMOTIONS[gold], EMOTIONS[pred]
    with Browser() as browser:
        browser.open(path)
        browser.wait_for(READY)
        png = browser.screenshot()
        save_artifact("browser.png", png)
        spread, ink = pixel_spread(png)
        assert spread > 20 and ink > 0.05, (spread, ink)  # a blank or unstyled page is near (0, 0)
        assert browser.evaluate("document.getElementById('count').textContent") == f"{len(clips)} of {len(clips)} clips"
        assert len(browser.evaluate(CARDS)) == PAGE_SIZE
        browser.click(f"#matrix button[data-gold='{gold}'][data-pred='{pred}']")
        browser.wait_for(f"document.getElementById('count').textContent.startsWith('{expected} of')")
        shown = browser.evaluate(CARDS)
        assert len(shown) == min(expected, PAGE_SIZE) and {(g, p) for _n, g, p in shown} == {(gold, pred)}
        assert browser.evaluate("location.hash") == f"#cell={gold},{pred}"
        assert browser.evaluate("document.querySelector('#matrix button.selected').dataset.pred") == pred
        browser.click(f"#matrix button[data-gold='{gold}'][data-pred='{pred}']")  # the same cell again clears it
        browser.wait_for(f"document.getElementById('count').textContent.startsWith('{len(clips)} of')")
        assert browser.errors == [] and browser.remote_requests == []


def test_hash_pins_split_sort_and_page(page):
    need_chromium()
    path, clips = page
    candidates = sorted((c for c in clips if c["candidate"]), key=lambda c: (c["confidence"], c["name"]))
    by_loss = sorted(clips, key=lambda c: (c["loss"] is None, -(c["loss"] or 0), c["name"]))
    with Browser() as browser:
        browser.open(path, "split=candidate&sort=conf-asc")
        browser.wait_for(READY)
        assert [n for n, _g, _p in browser.evaluate(CARDS)] == [c["name"] for c in candidates][:PAGE_SIZE]
        browser.open(path, "page=2")  # default sort: loss, worst first; unscored clips last
        browser.wait_for(f"document.querySelector('.pager .page').textContent === 'page 2 of 3'")
        assert [n for n, _g, _p in browser.evaluate(CARDS)] == [c["name"] for c in by_loss][PAGE_SIZE:2 * PAGE_SIZE]
        browser.click(".pager .next")
        browser.wait_for("location.hash === '#page=3'")
        assert len(browser.evaluate(CARDS)) == len(clips) - 2 * PAGE_SIZE
        browser.open(path, "missing=faces")
        browser.wait_for(READY)
        assert {n for n, _g, _p in browser.evaluate(CARDS)} == {c["name"] for c in clips if "faces" in c["missing"]}
        assert browser.errors == []


def test_hostile_subtitle_and_name_show_as_text(page):
    need_chromium()
    path, _clips = page
    with Browser() as browser:
        browser.open(path, "sort=name")  # '<' sorts first: the hostile clip is the first card
        browser.wait_for(READY)
        time.sleep(0.3)  # an injected <img onerror> would have fired by now
        card = browser.evaluate("""(() => { const c = document.querySelector('.card');
            return {name: c.querySelector('.name').textContent, en: c.querySelector('.sub.en').textContent,
                    zh: c.querySelector('.sub.zh').textContent, injected: c.querySelectorAll('script, img[src=x], .name *, .sub *').length,
                    pwned: typeof window.__pwned}; })()""")
        assert card == {"name": "<b>bold</b>", "en": HOSTILE, "zh": "</script><!--", "injected": 0, "pwned": "undefined"}
        assert browser.errors == [] and browser.remote_requests == []


def test_a_missing_track_is_shown_apart_from_a_failure(tmp_path):
    """A clip whose video has no sound track: its `no_audio_track` record is grey and says it is not a
    failure (the stage counts it as a clip without the modality); a decode error stays red."""
    need_chromium()
    clip = Clip("mute", label="sad", split="labelled")
    proba = {"kind": "labelled_oof", "candidate": "0", **{e: "0.1" for e in EMOTIONS[:5]}, "surprise": "0.5"}
    failures = [["extract.prosody", "no_audio_track", "no audio stream"], ["extract.faces", "unreadable_media", "moov"]]
    path = tmp_path / "index.html"
    write_page(path, STORES, [clip_row(clip, proba, {s: "0.2" for s in STORES}, STORES, None, failures, None)])
    with Browser() as browser:
        browser.open(path)
        browser.wait_for(READY)
        items = browser.evaluate("""[...document.querySelectorAll('.card .failures li')].map(li =>
            [li.textContent, li.className, getComputedStyle(li).color])""")
        assert browser.errors == []
    (track, track_class, grey), (failed, failed_class, red) = items
    assert track == "extract.prosody · no_audio_track (not a failure): no audio stream" and track_class == "track"
    assert failed == "extract.faces · unreadable_media: moov" and failed_class == ""
    assert red == "rgb(207, 34, 46)" and grey == "rgb(89, 99, 110)"  # --bad and --muted


@pytest.mark.parametrize("use, said", [
    ("unused", "refine suggests worried · flagged by refine · (not trained on: train.use_refined is off"),
    ("trained", "refined worried · flagged by refine · (trained so: flagged clips left out of training)"),
    ("unknown", "refined worried · flagged by refine · predicted surprise")])  # made without metrics.json
def test_a_refined_label_says_whether_training_used_it(tmp_path, use, said):
    """With train.use_refined off (the default) the card does not claim the clip left training."""
    need_chromium()
    clip = Clip("x", label="sad", split="labelled")
    proba = {"kind": "labelled_oof", "candidate": "0", **{e: "0.1" for e in EMOTIONS[:5]}, "surprise": "0.5"}
    refined = {"name": "x", "label": "sad", "refined": "worried", "changed": True, "dropped": True}
    path = tmp_path / "index.html"
    write_page(path, STORES, [clip_row(clip, proba, {s: "0.2" for s in STORES}, STORES, refined, [], None)],
               refine_use=use)
    with Browser() as browser:
        browser.open(path)
        browser.wait_for(READY)
        text = browser.evaluate("document.querySelector('.card .labels').textContent")
        assert browser.errors == []
    assert text.startswith("gold sad · " + said), text


@pytest.mark.slow
def test_browser_stays_fast_on_10k_clips(tmp_path):
    need_chromium()
    path = tmp_path / "index.html"
    size = write_page(path, STORES, synthetic_rows(10_000))
    with Browser() as browser:
        start = time.monotonic()
        browser.open(path)
        browser.wait_for(READY, timeout=60)
        loaded = time.monotonic() - start
        start = time.monotonic()
        browser.click("#matrix button[data-gold='angry'][data-pred='happy']")
        browser.wait_for("location.hash === '#cell=angry,happy'")
        clicked = time.monotonic() - start
        assert {(g, p) for _n, g, p in browser.evaluate(CARDS)} == {("angry", "happy")}
        assert len(browser.evaluate(CARDS)) == PAGE_SIZE  # ~230 clips in that cell, one page drawn
    print(f"10k clips: page {size / 2**20:.2f} MiB, loaded and drawn in {loaded:.2f} s, cell click {clicked:.2f} s")
    assert size < 4 * 2**20 and loaded < 15 and clicked < 5


def _dvc(*args: str, cwd: Path = REPO) -> None:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=cwd, env=env, check=True,
                   capture_output=True, text=True)


@pytest.mark.parametrize("command", [["plots", "show"], ["plots", "diff", "HEAD"]], ids=["show", "diff"])
def test_dvc_plots_page_loads_no_remote_script_and_draws_every_chart(tmp_path, command):
    need_chromium()
    _dvc(*command, "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)  # every script inline
    assert "cdn.jsdelivr" not in page and "vega-embed@7.3.0" in page
    expected = len(re.findall(r"vegaEmbed\('#", page))
    assert expected == 4  # confusion, curves, per-class F1, modality weights
    with Browser(1280, 1800) as browser:
        browser.open(tmp_path / "plots" / "index.html")
        browser.wait_for(f"document.querySelectorAll('.vega-embed .chart-wrapper > canvas, .vega-embed .chart-wrapper > svg').length >= {expected}")
        time.sleep(0.3)
        png = browser.screenshot()
        save_artifact(f"plots-{command[1]}.png", png)
        spread, ink = pixel_spread(png)
        assert spread > 10 and ink > 0.03, (spread, ink)
        assert browser.errors == [] and browser.remote_requests == []
        # every chart drew at its size: a spec vega-lite rejects leaves an empty embed
        sizes = browser.evaluate("[...document.querySelectorAll('.vega-embed .chart-wrapper > canvas, .vega-embed .chart-wrapper > svg')]"
                                 ".map(c => c.getBoundingClientRect().width)")
        assert len(sizes) == expected and min(sizes) > 200

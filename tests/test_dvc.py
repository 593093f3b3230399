"""The real DVC pipeline, ingest to predictions, on a subset of the demo data in a throwaway repo."""

import csv
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo"
BIN = Path(sys.executable).parent


def _sh(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout if stdout_only else done.stdout + done.stderr


def _rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def _demo_subset(dst: Path, per_class: int = 3, candidates: int = 4) -> None:
    """The demo layout with `per_class` labelled clips per emotion and a few candidates."""
    by_class = defaultdict(list)
    for row in _rows(DEMO / "track1_train_disdim.csv"):
        by_class[row["discrete"]].append(row)
    labelled = [r for rows in by_class.values() for r in rows[:per_class]]
    cands = _rows(DEMO / "track_all_candidates.csv")[:candidates]
    names = {r["name"] for r in labelled + cands}
    (dst / "video").mkdir(parents=True)
    for name in names:
        shutil.copy(DEMO / "video" / f"{name}.mp4", dst / "video")
    for file, rows in (("track1_train_disdim.csv", labelled), ("track_all_candidates.csv", cands),
                       ("subtitle_chieng.csv", [r for r in _rows(DEMO / "subtitle_chieng.csv") if r["name"] in names])):
        with (dst / file).open("w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    _demo_subset(work / "data" / "subset")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["ingest"]["root"] = "data/subset"
    params["train"].update(folds=3, epochs=4, ensemble=1)  # one checkpoint per fold: fold<k>.pt
    params["llm"]["enabled"] = True  # the LLM stages run here (off by default in params.yaml)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    _sh(["git", "init", "-q"], work)
    _sh([str(BIN / "dvc"), "init", "-q"], work)
    shutil.copytree(REPO / ".dvc" / "plots", work / ".dvc" / "plots")  # the plot templates dvc.yaml names
    _sh([str(BIN / "dvc"), "config", "plots.html_template", "plots/offline.html"], work)
    _sh([str(BIN / "dvc"), "repro"], work)
    return work


@pytest.mark.slow
def test_repro_runs_ingest_to_predictions(repo: Path):
    assert len((repo / "data" / "manifest.jsonl").read_text().splitlines()) == 22
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for store in params["extract"]:
        summary = json.loads((repo / "reports" / "extract" / f"{store}.json").read_text())
        assert summary["done"] == 22 and summary["failed"] == 0, summary
    enrich = json.loads((repo / "reports" / "llm" / "enrich.json").read_text())
    assert enrich["ok"] == 22 and enrich["asked"] == 2  # the demo's two distinct sentences, asked once each
    assert json.loads((repo / "reports" / "extract" / "text_enriched.json").read_text())["done"] == 22
    llm = json.loads((repo / "reports" / "llm" / "metrics.json").read_text())
    assert llm["scored"] == 18 and 0 <= llm["weighted_f1"] <= 1
    refine = json.loads((repo / "reports" / "refine" / "summary.json").read_text())
    assert "llm_labels" in json.dumps(refine)  # the LLM labels voted
    metrics = json.loads((repo / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["weighted_f1"] <= 1 and metrics["n_labelled"] == 18
    assert metrics["speaker_independent"] is True and metrics["candidates"]["coverage"] == 1.0
    predictions = _rows(repo / "reports" / "predictions.csv")
    assert sorted(p["name"] for p in predictions) == sorted(r["name"] for r in _rows(
        repo / "data" / "subset" / "track_all_candidates.csv"))
    assert len(predictions) == 4 and {p["discrete"] for p in predictions} <= {
        "neutral", "angry", "happy", "sad", "worried", "surprise"}
    assert sorted(p.name for p in (repo / "models" / "fusion").glob("fold*.pt")) == [  # + each fold's linear member
        "fold0-linear.pt", "fold0.pt", "fold1-linear.pt", "fold1.pt", "fold2-linear.pt", "fold2.pt"]
    assert "ecmf (all)" in (repo / "reports" / "ablation.md").read_text()
    shown = _sh([str(BIN / "dvc"), "metrics", "show", "--json"], repo, stdout_only=True)
    assert "weighted_f1" in shown and "clips_per_second" not in shown and '"seconds' not in shown  # scores, no timings
    plots = json.loads(_sh([str(BIN / "dvc"), "plots", "show", "--json"], repo, stdout_only=True))
    assert {"reports/plots/confusion.csv", "reports/plots/curves.csv"} <= set(plots["data"]), list(plots["data"])
    page = (repo / "reports" / "browser" / "index.html").read_text(encoding="utf-8")
    rows = json.loads(page.split('id="mer-data">')[1].split("</script>")[0])["rows"]
    assert sorted(r[0] for r in rows) == sorted(json.loads(line)["name"] for line in
                                                (repo / "data" / "manifest.jsonl").read_text().splitlines())
    assert len(list((repo / "reports" / "browser" / "thumbs").glob("*.jpg"))) == 22  # every subset clip has video


@pytest.mark.slow
def test_second_repro_does_nothing_and_one_param_reruns_one_extractor(repo: Path):
    dvc = str(BIN / "dvc")
    assert "Data and pipelines are up to date" in _sh([dvc, "repro"], repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["extract"]["prosody"]["options"]["n_mfcc"] = 8
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    out = _sh([dvc, "repro"], repo)
    assert "Running stage 'extract@prosody'" in out
    others = [s for s in params["extract"] if s != "prosody"]
    assert not any(f"Running stage 'extract@{s}'" in out for s in others)
    assert "Running stage 'ingest'" not in out
    assert "Running stage 'train'" in out  # it depends on the prosody store


@pytest.mark.slow
def test_a_wrong_setting_stops_before_dvc_touches_the_manifest(repo: Path):
    """The check stage runs first: a typo'd dataset root is one line naming the key, and the
    old manifest (which DVC would delete before rerunning ingest) is still there."""
    dvc = str(BIN / "dvc")
    manifest = (repo / "data" / "manifest.jsonl").read_bytes()
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["ingest"]["root"] = "data/subsett"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run([dvc, "repro"], cwd=repo, env=env, capture_output=True, text=True)
        assert done.returncode != 0
        assert "error: params key 'ingest.root' is 'data/subsett', which is not a folder" in done.stdout + done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert (repo / "data" / "manifest.jsonl").read_bytes() == manifest
    finally:
        (repo / "params.yaml").write_text(original)
    assert "Running stage 'ingest'" not in _sh([dvc, "repro"], repo)  # the same check passes again: nothing reruns


@pytest.mark.slow
def test_a_relabelled_clip_reruns_training_not_extraction(repo: Path):
    """Labels are not features: the extract stages read data/media.jsonl, the clips without labels,
    so fixing one label in the labels file reruns ingest, refine and train, and no extractor."""
    dvc = str(BIN / "dvc")
    labels = repo / "data" / "subset" / "track1_train_disdim.csv"
    original, media = labels.read_text(encoding="utf-8"), (repo / "data" / "media.jsonl").read_bytes()
    rows = _rows(labels)
    rows[0]["discrete"] = "sad" if rows[0]["discrete"] != "sad" else "happy"
    with labels.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        ran = _ran(_sh([dvc, "repro"], repo))
        assert {"ingest", "refine", "train"} <= ran, ran
        # (thumbs reruns: it depends on the dataset folder itself, and makes one JPEG per clip)
        assert not {s for s in ran if s.startswith("extract@") or s in ("enrich", "llm_labels", "text_enriched")}, ran
        assert (repo / "data" / "media.jsonl").read_bytes() == media
        relabelled = [json.loads(line) for line in (repo / "data" / "manifest.jsonl").read_text().splitlines()]
        assert next(c for c in relabelled if c["name"] == rows[0]["name"])["label"] == rows[0]["discrete"]
        assert all(json.loads(line)["label"] is None for line in media.decode().splitlines())
    finally:
        labels.write_text(original, encoding="utf-8")
    assert not {s for s in _ran(_sh([dvc, "repro"], repo)) if s.startswith("extract@")}


@pytest.mark.slow
def test_a_replaced_clip_is_the_one_clip_extracted_again(repo: Path):
    """DVC removes a stage's output before rerunning it; the stage takes the unchanged clips from
    the previous run (found in DVC's cache by the MD5 features/.partial/ records), so a clip
    replaced under its name is extracted again alone, and the store is what extracting every
    clip would give."""
    dvc = str(BIN / "dvc")
    names = sorted(p.stem for p in (repo / "data" / "subset" / "video").glob("*.mp4"))
    replaced = repo / "data" / "subset" / "video" / f"{names[0]}.mp4"
    original = replaced.read_bytes()
    shutil.copy(DEMO / "video" / "sample_00000080.mp4", replaced)  # a clip not in the subset, fixed in its place
    try:
        ran = _ran(_sh([dvc, "repro"], repo))
        stores = [s for s in yaml.safe_load((repo / "params.yaml").read_text())["extract"]] + ["text_enriched",
                                                                                                "llm_labels"]
        assert {f"extract@{s}" for s in stores if s not in ("text_enriched", "llm_labels")} <= ran, ran
        for store in stores:
            summary = json.loads((repo / "reports" / "extract" / f"{store}.json").read_text())
            assert (summary["done"], summary["skipped"], summary["failed"]) == (1, 21, 0), (store, summary)
        media = repo / "data" / "media.jsonl"
        _sh([sys.executable, "-m", "pipeline.stages.extract", "prosody", str(media), "scratch/prosody.h5",
             "scratch/prosody.json", "--no-progress"], repo)
        assert (repo / "features" / "prosody.h5").read_bytes() == (repo / "scratch" / "prosody.h5").read_bytes()
    finally:
        replaced.write_bytes(original)
        shutil.rmtree(repo / "scratch", ignore_errors=True)
    back = _sh([dvc, "repro"], repo)  # the clip as it was: DVC restores each store from its run cache
    assert not any(f"Running stage 'extract@" in line for line in back.splitlines()), back


@pytest.fixture(scope="module")
def exp_repo(repo: Path, tmp_path_factory) -> Path:
    """A copy of the reproduced repo with everything committed, as `dvc exp run` needs."""
    work = tmp_path_factory.mktemp("exp") / "repo"
    shutil.copytree(repo, work, symlinks=True)
    _sh(["git", "add", "-A"], work)
    _sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "reproduced"], work)
    assert "Data and pipelines are up to date" in _sh([str(BIN / "dvc"), "repro"], work)
    return work


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


@pytest.mark.slow
def test_stores_are_chosen_in_params_alone(exp_repo: Path):
    """Removing stores from train.stores reruns train and nothing upstream; a store added only in
    params.yaml is built, becomes a dep of train, and nothing else is re-extracted."""
    dvc = str(BIN / "dvc")
    out = _sh([dvc, "exp", "run", "-S", "train.stores=[prosody,whisper]"], exp_repo)
    ran = _ran(out)
    assert {"train", "ablate"} <= ran, ran
    assert not {s for s in ran if s.startswith(("extract@", "enrich", "llm_", "text_enriched", "ingest"))}, ran
    assert sorted(p.name for p in (exp_repo / "features" / "inputs" / "train").iterdir()) == [
        "prosody.json", "whisper.json"]  # frames & co. pruned by the check stage
    ckpt = __import__("torch").load(exp_repo / "models" / "fusion" / "fold0.pt", weights_only=True)
    assert ckpt["stores"] == ["prosody", "whisper"]
    assert set(ckpt["store_settings"]) == {"prosody", "whisper"}  # what mer predict checks its fresh stores against
    from pipeline.fusion.checkpoint import store_settings  # ...the settings of the store files train read

    assert ckpt["store_settings"]["prosody"] == store_settings(exp_repo / "features" / "prosody.h5")
    assert json.loads(ckpt["store_settings"]["prosody"])["extractor"] == "numpy_prosody"

    params = yaml.safe_load((exp_repo / "params.yaml").read_text())
    params["extract"]["prosody8"] = {"extractor": "numpy_prosody", "options": {"n_mfcc": 8}}
    params["train"]["stores"] = ["prosody", "prosody8"]
    (exp_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    dot = _sh([dvc, "dag", "--dot"], exp_repo, stdout_only=True)
    assert '"extract@prosody8" -> "train_store@prosody8"' in dot and '"train_store@prosody8" -> "train"' in dot, dot
    assert '"train_store@whisper"' not in dot  # no consumer of train names whisper any more
    ran = _ran(_sh([dvc, "exp", "run"], exp_repo))
    assert {"extract@prosody8", "train_store@prosody8", "train"} <= ran, ran
    assert not {s for s in ran if s.startswith("extract@") and s != "extract@prosody8"}, ran
    assert json.loads((exp_repo / "features" / "inputs" / "train" / "prosody8.json").read_text())["clips"] == 22

    # a code change in the closure of a store's digest stage and of train shows in dvc status
    with (exp_repo / "pipeline" / "store.py").open("a") as fh:
        fh.write("# touched\n")
    status = _sh([dvc, "status"], exp_repo, stdout_only=True)
    assert "train_store@prosody8:" in status and "extract@prosody:" in status and "train:" in status, status


@pytest.mark.slow
def test_llm_enabled_false_loads_no_llm(exp_repo: Path):
    """One key turns the LLM off: the backends point at a port nobody listens on, so any model call
    would fail the stage; train and refine leave the LLM stores out and say so."""
    dvc = str(BIN / "dvc")
    _sh(["git", "checkout", "-q", "--", "."], exp_repo)
    params = yaml.safe_load((exp_repo / "params.yaml").read_text())
    dead = {"base_url": "http://127.0.0.1:9/v1", "model": "none"}
    params["llm"].update(backend="endpoint", backend_options=dead)
    params["llm_labels"]["options"].update(backend="endpoint", backend_options=dead)
    (exp_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    out = _sh([dvc, "exp", "run", "-S", "llm.enabled=false"], exp_repo)
    assert {"enrich", "llm_labels", "text_enriched", "refine", "train"} <= _ran(out)
    assert "no model loaded" in out and "llm.enabled is false: text_enriched left out of train.stores" in out
    assert "llm.enabled is false: llm_labels left out of refine.label_stores" in out
    assert not {s for s in _ran(out) if s.startswith("extract@")}
    assert not {"ingest", "train_store@prosody", "refine_store@prosody"} & _ran(out)  # the switch reruns LLM work only
    ckpt = __import__("torch").load(exp_repo / "models" / "fusion" / "fold0.pt", weights_only=True)
    assert "text_enriched" not in ckpt["stores"] and "prosody" in ckpt["stores"]
    refine = json.loads((exp_repo / "reports" / "refine" / "summary.json").read_text())
    assert "llm_labels" not in refine["sources"]
    assert json.loads((exp_repo / "reports" / "llm" / "enrich.json").read_text())["enabled"] is False
    assert json.loads((exp_repo / "reports" / "llm" / "metrics.json").read_text())["enabled"] is False


@pytest.mark.slow
def test_a_queued_sweep_runs_and_shows(exp_repo: Path):
    """`dvc exp run --queue -S a=1,2 -S b=3,4` queues the grid; `dvc queue start` runs it; `dvc exp show` lists it."""
    import time

    dvc = str(BIN / "dvc")
    _sh(["git", "checkout", "-q", "--", "."], exp_repo)
    _sh([dvc, "exp", "run", "--queue", "-S", "train.lr=0.001,0.003", "-S", "train.epochs=2,3"], exp_repo)
    assert _sh([dvc, "queue", "status"], exp_repo, stdout_only=True).count("Queued") == 4
    _sh([dvc, "queue", "start"], exp_repo)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = _sh([dvc, "queue", "status"], exp_repo, stdout_only=True)
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 4, status + _sh([dvc, "queue", "logs", status.split()[4]], exp_repo)
    queued = {line.split()[1] for line in status.splitlines() if line.rstrip().endswith("Success")}
    shown = json.loads(_sh([dvc, "exp", "show", "--json"], exp_repo, stdout_only=True))
    runs = [exp for row in shown for exp in (row.get("experiments") or []) if exp.get("name") in queued]
    grid = set()
    for exp in runs:
        data = exp["revs"][0]["data"]
        train = data["params"]["params.yaml"]["data"]["train"]
        assert 0 <= data["metrics"]["reports/metrics.json"]["data"]["weighted_f1"] <= 1
        grid.add((train["lr"], train["epochs"]))
    assert grid == {(0.001, 2), (0.001, 3), (0.003, 2), (0.003, 3)}, grid

"""`make bench-heldout`'s corpus split: by speaker, labels of the candidates kept outside the root."""

import csv

from pipeline.bench.heldout import score, split_items, write_heldout
from pipeline.data.convert import Item
from pipeline.data.ingest import ingest
from pipeline.config import IngestConfig


def _rows(path):
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def test_ravdess_split_by_actor_keeps_candidate_labels_out_of_the_root(tmp_path):
    items = [Item(name=f"a{actor:02d}_{i}", label=["happy", "sad"][i % 2], group=f"actor_{actor:02d}",
                  english="Kids are talking by the door.") for actor in range(1, 13) for i in range(4)]
    labelled, cands = split_items("ravdess", items, 0)
    assert {i.group for i in labelled} == {f"actor_{a:02d}" for a in range(1, 9)}
    assert {i.group for i in cands} == {f"actor_{a:02d}" for a in range(9, 13)}
    root, truth = tmp_path / "dataset", tmp_path / "truth.csv"
    write_heldout(labelled, cands, root, truth)
    assert not truth.is_relative_to(root)
    assert {r["name"] for r in _rows(root / "track1_train_disdim.csv")} == {i.name for i in labelled}
    assert "discrete" not in _rows(root / "track_all_candidates.csv")[0]
    assert {r["name"]: r["discrete"] for r in _rows(truth)} == {i.name: i.label for i in cands}
    clips = ingest(IngestConfig(root=str(root)))
    assert sum(bool(c.label) for c in clips) == 32 and sum(c.candidate for c in clips) == 16
    assert not any(c.label for c in clips if c.candidate)  # the pipeline never sees a candidate's label


def test_meld_split_keeps_whole_dialogues_and_scores_missing_as_wrong():
    items = [Item(name=f"{split}_dia{d}_utt{u}", label="neutral", group=f"{split}_dia{d}", english="hi")
             for split, n in (("train", 20), ("dev", 5)) for d in range(n) for u in range(3)]
    labelled, cands = split_items("meld", items, 10)
    assert 10 <= len(labelled) < 20 and len(labelled) % 3 == 0  # whole dialogues, seeded sample
    assert {i.group.split("_")[0] for i in cands} == {"dev"} and len(cands) == 15
    truth = {"a": "happy", "b": "sad"}
    assert score({"a": "happy"}, truth, 1) == {"weighted_f1": 0.5, "accuracy": 0.5, "coverage": 0.5, "candidates": 2}

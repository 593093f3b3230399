"""Bad settings stop at load with one line (key, value, what is allowed); every `mer` command
answers --help and missing arguments without a traceback; errors that reach a user are one line."""

from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import COMMANDS
from pipeline.cli import main as mer
from pipeline.config import ConfigError, EngineConfig, ExtractorSpec, load_params
from pipeline.errors import MerError, TrainError
from pipeline.extract.engine import ExtractionFailed, run_extraction
from pipeline.llm.report import label_store_metrics
from pipeline.manifest import Clip, write_manifest
from pipeline.store import StoreReader

REPO = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _with(change: dict, tmp_path: Path) -> Path:
    """The repo's params.yaml with `change` ({"a.b.c": value}) applied, root pointed at a real folder."""
    params = copy.deepcopy(PARAMS)
    params["ingest"]["root"] = str(REPO / "data" / "demo")
    for dotted, value in change.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, allow_unicode=True))
    return path


@pytest.mark.parametrize("change, key", [
    ({"train.class_balance": "weight"}, "train.class_balance"),
    ({"train.model.kind": "ecfm"}, "train.model.kind"),
    ({"train.model.heads": 3}, "train.model.heads"),
    ({"train.folds": 1}, "train.folds"),
    ({"train.stores": ["prosody", "hubert"]}, "train.stores"),
    ({"engine.batch_size": 0}, "engine.batch_size"),
    ({"engine.max_failed_fraction": 1.5}, "engine.max_failed_fraction"),
    ({"engine.device": "gpu"}, "engine.device"),
    ({"refine.correct_threshold": 2}, "refine.correct_threshold"),
    ({"refine.metod": "dawid_skene"}, "refine.metod"),
    ({"refine.stores": ["prosdy"]}, "refine.stores"),
    ({"refine.lightgbm": {"num_leaves": 1}}, "refine.lightgbm.num_leaves"),
    ({"refine.dawid_skene": {"smoothing": 0}}, "refine.dawid_skene.smoothing"),
    ({"extract.llm2": {"extractor": "llm_zero_shot"}}, "extract.llm2"),
    ({"llm.language": "french"}, "llm.language"),
    ({"llm.backend_options": {"model_pth": "/x"}}, "llm.backend_options"),
    ({"text_enriched.options": {"backend": "e5", "langage": "english"}}, "text_enriched.options"),
    ({"extract.frames.options.num_frame": 8}, "extract.frames.options"),
    ({"extract.whisper.extractor": "whisperx"}, "whisperx"),
    ({"ingest.root": "data/dmeo"}, "ingest.root"),
])
def test_mer_check_names_the_key_in_one_line(change, key, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mer(["check", "--params", str(_with(change, tmp_path))])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and key in err, err


def test_mer_check_passes_the_repo_params(tmp_path, capsys):
    mer(["check", "--params", str(_with({}, tmp_path)), str(tmp_path / "check.json")])
    assert ": ok (" in capsys.readouterr().out
    assert json.loads((tmp_path / "check.json").read_text())["checked"]


def test_mer_check_prunes_the_digests_of_its_params_project_only(tmp_path, monkeypatch, capsys):
    """Stale store digests are pruned beside the params file checked, never in the working directory."""
    elsewhere = tmp_path / "cwd"
    for root in (tmp_path, elsewhere):
        (root / "features" / "inputs" / "train").mkdir(parents=True)
        for store in ("prosody", "whisper"):
            (root / "features" / "inputs" / "train" / f"{store}.json").write_text("{}")
    monkeypatch.chdir(elsewhere)
    mer(["check", "--params", str(_with({"train.stores": ["prosody"]}, tmp_path)), str(tmp_path / "check.json")])
    assert "whisper.json: removed" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "features" / "inputs" / "train").iterdir()) == ["prosody.json"]
    assert len(list((elsewhere / "features" / "inputs" / "train").iterdir())) == 2  # another project: untouched


def test_cuda_without_a_gpu_is_refused_at_check_and_train(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pipeline.devices.cuda_available", lambda: False)
    for key in ("train.device", "engine.device"):
        with pytest.raises(SystemExit):
            mer(["check", "--params", str(_with({key: "cuda"}, tmp_path))])
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"'{key}' is 'cuda'" in err and "auto | cpu" in err
    from pipeline.stages.train import main as train_main

    with pytest.raises(SystemExit):  # before any store is read: the manifest does not even exist
        train_main([str(tmp_path / "none.jsonl"), str(tmp_path / "m"), str(tmp_path / "r"),
                    "--params", str(_with({"train.device": "cuda"}, tmp_path))])
    assert "'train.device' is 'cuda'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_answers_help_and_missing_arguments(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mer([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    if command in ("extractors", "check", "build-demo"):
        return  # no required argument
    with pytest.raises(SystemExit) as exit_info:
        mer([command])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_store_info_on_a_missing_file_is_one_line():
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "store-info", "nope.h5"],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "nope.h5" in done.stderr


def test_every_user_error_derives_from_one_base():
    from pipeline.data.convert import ConvertError
    from pipeline.llm.enrich import EnrichmentFailed
    from pipeline.extract.engine import ModelMissingError
    from pipeline.extractors.base import UnknownExtractor
    from pipeline.data.ingest import IngestError
    from pipeline.llm.backends import LLMError
    from pipeline.store import FingerprintMismatch, StoreError
    from pipeline.refine.weak import FoldError

    for cls in (ConfigError, ConvertError, EnrichmentFailed, ModelMissingError, UnknownExtractor, IngestError,
                LLMError, FingerprintMismatch, StoreError, FoldError, ExtractionFailed, TrainError):
        assert issubclass(cls, MerError), cls
    assert UnknownExtractor("no such extractor").message() == "no such extractor"  # not KeyError's quotes


def test_failure_threshold_names_the_file_the_kinds_and_the_key(tmp_path):
    from fixtures_media import write_corrupt, write_empty

    clips = []
    for name, writer in (("a", write_corrupt), ("b", write_empty), ("c", write_corrupt)):
        writer(tmp_path / f"{name}.wav")
        clips.append(Clip(name=name, audio=str(tmp_path / f"{name}.wav")))
    write_manifest(clips, tmp_path / "m.jsonl")
    engine = EngineConfig(device="cpu", max_failed_fraction=0.1, decode_workers=1)
    with pytest.raises(ExtractionFailed) as info:
        run_extraction("prosody", ExtractorSpec("numpy_prosody", {}), engine, tmp_path / "m.jsonl",
                       tmp_path / "prosody.h5", progress=False)
    message = info.value.message()
    assert "3 of 3 clips failed" in message and "3 unreadable_media" in message
    assert str(tmp_path / "prosody.failures.jsonl") in message and "'engine.max_failed_fraction'" in message
    assert len((tmp_path / "prosody.failures.jsonl").read_text().splitlines()) == 3


def test_a_store_no_clip_has_is_valid_and_read_as_missing(tmp_path, capsys):
    clips = [Clip(name="a", audio="x.wav"), Clip(name="b", audio="y.wav")]  # no text at all
    write_manifest(clips, tmp_path / "m.jsonl")
    run_extraction("llm_labels", ExtractorSpec("toy", {"dim": 6}), EngineConfig(device="cpu"), tmp_path / "m.jsonl",
                   tmp_path / "llm_labels.h5", progress=False)
    with StoreReader(tmp_path / "llm_labels.h5") as reader:
        assert reader.empty
        values, mask = reader.read("utterance", ["a", "b"])
        assert values.shape == (2, 0) and not mask.any()
        seqs, seq_mask = reader.read_sequences("sequence", ["a"])
        assert seqs == [None] and not seq_mask.any()
    labelled = [Clip(name="a", audio="x.wav", label="sad")]
    assert label_store_metrics(labelled, tmp_path / "llm_labels.h5") == {"labelled": 1, "scored": 0,
                                                                          "no_subtitle": 1, "failed": 0}
    mer(["store-info", str(tmp_path / "llm_labels.h5")])
    assert "clips: 0 (no clip had this store's modality" in capsys.readouterr().out


def test_a_non_finite_loss_stops_with_the_fold_and_epoch(monkeypatch):
    from pipeline.fusion import member
    from pipeline.config import FusionConfig, TrainConfig
    from pipeline.fusion.train import Features, cross_validate

    rng = np.random.default_rng(0)
    clips = [Clip(name=f"c{i}", english="x", label=["sad", "happy"][i % 2], split="labelled") for i in range(24)]
    features = Features([c.name for c in clips], {"a": rng.standard_normal((24, 4)).astype(np.float32)},
                        np.ones((24, 1), bool), ["a"])
    monkeypatch.setattr(member, "_soft_cross_entropy", lambda *a: member.torch.tensor(float("nan")))
    cfg = TrainConfig(stores=["a"], model=FusionConfig(width=8), folds=2, epochs=2)
    with pytest.raises(TrainError, match=r"fold 0, epoch 0: the training loss is nan.*train\.lr"):
        cross_validate(clips, features, cfg)


def test_non_finite_feature_values_count_as_missing(tmp_path):
    from pipeline.store import StoreIdentity, StoreWriter
    from pipeline.fusion.train import load_features

    writer = StoreWriter(tmp_path / "s.h5", StoreIdentity("s", "toy", {}))
    writer.add("a", {"utterance": np.array([1.0, np.nan], np.float32)})
    writer.add("b", {"utterance": np.array([1.0, 2.0], np.float32)})
    writer.finalize(["a", "b"])
    features = load_features([Clip(name="a"), Clip(name="b")], ["s"], tmp_path)
    assert features.mask[:, 0].tolist() == [False, True] and np.isfinite(features.inputs["s"]).all()


def test_folds_that_cannot_be_made_name_train_folds():
    from pipeline.config import FusionConfig, TrainConfig
    from pipeline.fusion.train import Features, cross_validate

    clips = [Clip(name=f"c{i}", english="x", label="sad", split="labelled", group=f"g{i}") for i in range(2)]
    features = Features([c.name for c in clips], {"a": np.ones((2, 2), np.float32)}, np.ones((2, 1), bool), ["a"])
    with pytest.raises(TrainError, match=r"2 labelled clips cannot make 3 folds.*'train\.folds' \(now 3\)"):
        cross_validate(clips, features, TrainConfig(stores=["a"], model=FusionConfig(width=8), folds=3))


@pytest.mark.parametrize("speakers", [3, 1])
def test_fewer_speakers_than_folds_still_train_and_say_so(speakers, caplog):
    """3 named speakers at 5 folds: 3 folds, each holding one speaker out (it stopped the run with
    "3 groups cannot make 5 group-aware folds"); 1 speaker: its clips are split, and the result says
    the folds are not speaker-independent."""
    from pipeline.config import FusionConfig, TrainConfig
    from pipeline.fusion.train import Features, cross_validate

    rng = np.random.default_rng(0)
    n = 60
    labels = ["sad", "happy"] * (n // 2)
    clips = [Clip(name=f"c{i}", label=labels[i], split="labelled", group=f"actor{i % speakers}") for i in range(n)]
    x = rng.normal(size=(n, 4)).astype(np.float32) + np.array([[2.0 * (lab == "sad")] for lab in labels], np.float32)
    features = Features([c.name for c in clips], {"a": x}, np.ones((n, 1), bool), ["a"])
    cfg = TrainConfig(stores=["a"], model=FusionConfig(width=8), folds=5, epochs=2, ensemble=1,
                      self_training=False, screen_stores=False)
    with caplog.at_level(logging.WARNING):
        result = cross_validate(clips, features, cfg, fold_lines=False)
    assert np.isfinite(result.oof_probs).all() and len(result.labelled) == n
    if speakers == 3:
        assert len(result.fold_scores) == 3 and result.speaker_independent
        assert result.folds_grouped_by == "named"
        assert "name 3 speakers (groups), fewer than params key 'train.folds' (5): each of 3 folds" in caplog.text
    else:
        assert len(result.fold_scores) == 5 and not result.speaker_independent
        assert result.folds_grouped_by == "one speaker"
        assert "every labelled clip names one speaker (group 'actor0')" in caplog.text


def test_params_sections_are_typed():
    params = load_params(REPO / "params.yaml")
    assert type(params.refine).__name__ == "RefineConfig" and type(params.llm).__name__ == "EnrichConfig"
    assert type(params.text_enriched).__name__ == "ExtractorSpec"

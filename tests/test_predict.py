import json

import pytest
import torch
from fixtures_media import write_clip

from pipeline.cli import main as cli_main
from pipeline.config import EnrichConfig, EngineConfig, ExtractorSpec, FusionConfig, Params, TrainConfig
from pipeline.extract.engine import run_extraction
from pipeline.data.ingest import ingest
from pipeline.manifest import write_manifest
from pipeline.errors import MerError
from pipeline.fusion.predict import run_predict
from pipeline.fusion.train import cross_validate, load_features


@pytest.fixture
def trained(tmp_path):
    """Two stores (prosody + toy text) and 2 fold models trained on a 12-clip dataset."""
    from conftest import build_dataset

    from pipeline.config import IngestConfig
    from pipeline.labels import EMOTIONS

    labels = {f"s{i:02d}": EMOTIONS[i % 6] for i in range(12)}
    clips = ingest(IngestConfig(root=str(build_dataset(tmp_path / "ds", labels, [], seconds=0.4))))
    write_manifest(clips, tmp_path / "m.jsonl")
    extract = {"prosody": ExtractorSpec("numpy_prosody", {}), "words": ExtractorSpec("toy", {})}
    engine = EngineConfig(device="cpu")
    for store, spec in extract.items():
        run_extraction(store, spec, engine, tmp_path / "m.jsonl", tmp_path / "f" / f"{store}.h5", progress=False)
    cfg = TrainConfig(stores=["prosody", "words"], model=FusionConfig(width=16), folds=2, epochs=2)
    result = cross_validate(clips, load_features(clips, cfg.stores, tmp_path / "f"), cfg)
    models = tmp_path / "models"
    models.mkdir()
    for ckpt in result.checkpoints:
        torch.save(ckpt, models / f"fold{ckpt['fold']}.pt")
    return Params(engine=engine, extract=extract, train=cfg), models


def test_predict_new_clips_with_a_missing_modality(trained, tmp_path):
    params, models = trained
    with_audio = write_clip(tmp_path / "new_a.mp4", seconds=0.6, tone_hz=300.0)
    without_audio = write_clip(tmp_path / "new_b.mp4", seconds=0.6, audio=None)
    results = run_predict([with_audio, without_audio], params, models, english="so happy, really")
    assert [r["emotion"] in {"neutral", "angry", "happy", "sad", "worried", "surprise"} for r in results] == [True, True]
    for r in results:
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3
        assert list(r["modality_weights"]) == ["prosody", "words"]
    assert results[0]["missing_modalities"] == {}
    assert results[1]["missing_modalities"] == {"prosody": "no_audio_track"}
    assert results[1]["modality_weights"]["prosody"] == 0


def test_predict_cli_json_and_clear_errors(trained, tmp_path, capsys, monkeypatch):
    params, models = trained
    monkeypatch.setattr("pipeline.config.load_params", lambda path: params)
    clip = write_clip(tmp_path / "c.mp4", seconds=0.6)
    cli_main(["predict", str(clip), "--json", "--models", str(models), "--text", "hello"])
    out = json.loads(capsys.readouterr().out)
    assert out[0]["clip"] == str(clip) and "probabilities" in out[0]
    with pytest.raises(SystemExit):
        cli_main(["predict", str(tmp_path / "missing.mp4"), "--models", str(models)])
    assert "missing.mp4 not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["predict", str(clip), "--models", str(tmp_path / "nothing")])
    assert "train first" in capsys.readouterr().err


def test_predict_enriches_the_subtitle_for_a_text_enriched_model(tmp_path, caplog):
    """A model trained on `text_enriched`: predict asks the LLM of params `llm` first."""
    from conftest import build_dataset
    from llm_server import FakeLLMServer, Reply, subtitle_of

    from pipeline.config import IngestConfig
    from pipeline.labels import EMOTIONS

    labels = {f"s{i:02d}": EMOTIONS[i % 6] for i in range(12)}
    clips = ingest(IngestConfig(root=str(build_dataset(tmp_path / "ds", labels, [], seconds=0.4))))
    write_manifest(clips, tmp_path / "m.jsonl")
    run_extraction("text_enriched", ExtractorSpec("toy", {}), EngineConfig(device="cpu"), tmp_path / "m.jsonl",
                   tmp_path / "f" / "text_enriched.h5", progress=False)
    cfg = TrainConfig(stores=["text_enriched"], model=FusionConfig(kind="single", single="text_enriched",
                                                                    width=16), folds=2, epochs=1)
    result = cross_validate(clips, load_features(clips, cfg.stores, tmp_path / "f"), cfg)
    (tmp_path / "models").mkdir()
    torch.save(result.checkpoints[0], tmp_path / "models" / "fold1.pt")
    server = FakeLLMServer().start()
    server.respond = lambda body, call: Reply("Sounds delighted.")
    try:
        params = Params(engine=EngineConfig(device="cpu"), train=cfg, text_enriched=ExtractorSpec("toy"),
                        llm=EnrichConfig(backend="endpoint", backend_options={"base_url": server.url, "model": "m",
                                                                              "retries": 0},
                                         cache_path=str(tmp_path / "cache.sqlite")))
        clip = write_clip(tmp_path / "new.mp4", seconds=0.6)
        results = run_predict([clip], params, tmp_path / "models", english="We won!")
        asked = [json.loads(subtitle_of(b).splitlines()[2]) for b in server.requests]
        server.respond = lambda body, call: Reply("", status=500)  # the LLM is down: said, not silent
        with caplog.at_level("WARNING"):
            run_predict([clip], params, tmp_path / "models", english="We lost.")
    finally:
        server.stop()
    assert asked == ["We won!"]
    assert results[0]["missing_modalities"] == {} and list(results[0]["modality_weights"]) == ["text_enriched"]
    assert any("text_enriched: enrichment failed for 1 subtitle(s), encoded as their plain subtitle" in r.getMessage()
               for r in caplog.records)


def test_predict_refuses_stores_made_with_other_settings(trained, tmp_path):
    """The same width, other values (prosody's pitch floor changed in params after training): the
    models would read features they never saw, so predict stops and names the option."""
    from dataclasses import replace as changed

    from pipeline.fusion.checkpoint import store_settings

    params, models = trained
    settings = {s: store_settings(tmp_path / "f" / f"{s}.h5") for s in ("prosody", "words")}
    for path in models.glob("fold*.pt"):  # as the train stage saves them
        torch.save({**torch.load(path, weights_only=True), "store_settings": settings}, path)
    clip = write_clip(tmp_path / "new.mp4", seconds=0.6, tone_hz=300.0)
    assert run_predict([clip], params, models, english="hi")[0]["prediction"] == "model"
    other = changed(params, extract={**params.extract, "prosody": ExtractorSpec("numpy_prosody", {"fmin": 80.0})})
    with pytest.raises(MerError, match=r"store 'prosody': the models .* other settings \(fmin: 65\.0 -> 80\.0\); "
                                       r"restore the params .* or retrain"):
        run_predict([clip], other, models, english="hi")


def test_two_files_of_one_stem_are_two_clips(trained, tmp_path):
    """`a/x.mp4 b/x.mp4`: two clips, each answered from its own file (it stopped: "clip 'x' written twice")."""
    params, models = trained
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_clip(tmp_path / "a" / "x.mp4", seconds=0.6, tone_hz=300.0)
    second = write_clip(tmp_path / "b" / "x.mp4", seconds=0.6, audio=None)
    results = run_predict([first, second, first], params, models, english="fine")
    assert [r["clip"] for r in results] == [str(first), str(second), str(first)]
    assert [r["missing_modalities"] for r in results] == [{}, {"prosody": "no_audio_track"}, {}]


def test_predict_without_text_and_a_clip_with_nothing_usable(trained, tmp_path, capsys, monkeypatch):
    """The README's `mer predict clip --json` without --text: the text store of the new clips is empty
    (it used to crash); a clip with no audio and no text gets the training prior, flagged."""
    params, models = trained
    monkeypatch.setattr("pipeline.config.load_params", lambda path: params)
    with_audio = write_clip(tmp_path / "a.mp4", seconds=0.6, tone_hz=300.0)
    nothing = write_clip(tmp_path / "b.mp4", seconds=0.6, audio=None)
    cli_main(["predict", str(with_audio), str(nothing), "--json", "--models", str(models)])
    first, second = json.loads(capsys.readouterr().out)
    assert first["missing_modalities"] == {"words": "not present"} and first["prediction"] == "model"
    assert first["modality_weights"]["words"] == 0 and abs(sum(first["probabilities"].values()) - 1) < 1e-3
    assert second["prediction"] == "prior_no_modality"
    assert second["missing_modalities"] == {"prosody": "no_audio_track", "words": "not present"}
    prior = torch.load(models / "fold0.pt", weights_only=True)["prior"]
    assert list(second["probabilities"].values()) == pytest.approx(prior.tolist(), abs=1e-4)
    cli_main(["predict", str(nothing), "--models", str(models)])
    assert "training prior: no usable modality" in capsys.readouterr().out


def test_predict_stops_on_weights_of_an_earlier_model_version(trained, tmp_path):
    """A checkpoint whose ECMF weights were saved by the earlier nn.TransformerEncoder layer
    (other keys) stops with one line saying to retrain, instead of a state-dict dump."""
    from pipeline.errors import TrainError

    params, models = trained
    for path in models.glob("fold*.pt"):
        ckpt = torch.load(path, weights_only=True)
        ckpt["model"] = {k.replace("attention.0.qkv.weight", "attention.layers.0.self_attn.in_proj_weight"): v
                         for k, v in ckpt["model"].items()}
        torch.save(ckpt, path)
    clip = write_clip(tmp_path / "c.mp4", seconds=0.6)
    with pytest.raises(TrainError, match=r"fold 0 model: its weights do not fit this version's ecmf model .*"
                                         r"retrain \(`dvc repro train`\)"):
        run_predict([clip], params, models, english="hello")


def test_an_ogg_file_is_read_as_video_when_it_holds_a_picture_stream(tmp_path):
    """`mer predict` on .ogg: Vorbis sound is an audio clip, VP8 video in Ogg a video clip (the
    container says which); an unreadable .ogg stays audio, for its store to record why."""
    from fixtures_media import write_ogg_sound, write_ogg_video

    from pipeline.fusion.predict import clips_for

    video, sound = write_ogg_video(tmp_path / "film.ogg"), write_ogg_sound(tmp_path / "voice.ogg")
    broken = tmp_path / "broken.ogg"
    broken.write_bytes(b"OggS" + bytes(200))
    film, voice, bad = clips_for([video, sound, broken])
    assert (film.video, film.audio) == (str(video), None)
    assert (voice.video, voice.audio) == (None, str(sound))
    assert (bad.video, bad.audio) == (None, str(broken))

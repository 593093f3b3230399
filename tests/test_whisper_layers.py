"""Whisper's middle blocks in PyTorch from the packaged CTranslate2 weights (`options.layers`)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from fixtures_media import write_clip, write_wav

from pipeline.backends import audio as enc
from pipeline.backends.whisper_layers import WhisperLayers, WhisperWeightsError, read_encoder_weights
from pipeline.config import ConfigError
from pipeline.extractors.base import get_extractor
from pipeline.manifest import Clip

pytestmark = pytest.mark.skipif(enc.packaged_whisper_files() is None, reason="whisper packages not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return enc.materialize_whisper(tmp_path_factory.mktemp("cache") / "whisper-base")


@pytest.fixture(scope="module")
def middle(folder):
    extractor = get_extractor("whisper_encoder")({"model_path": str(folder), "layers": [2, 3, 4, 5]})
    extractor.load("cpu")
    return extractor


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t * (1 + 0.2 * np.sin(3 * t))) + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


def test_torch_encoder_equals_ctranslate2(folder):
    """The same weights in the same order: the last output matches CTranslate2 float32."""
    ct2 = enc.WhisperEncoder(folder, "cpu", "float32", 2)
    mel = ct2.mel(_speechlike(2.0))
    reference = ct2.encode([mel])[0]
    ours = WhisperLayers(folder / "model.bin", "cpu", [-1]).final_output([mel])[0]
    assert ours.shape == reference.shape == (1500, 512)
    np.testing.assert_allclose(ours, reference, atol=5e-3)
    assert np.corrcoef(ours.ravel(), reference.ravel())[0, 1] > 0.99999


def test_windows_of_different_lengths_batched_equal_single(folder):
    blocks = WhisperLayers(folder / "model.bin", "cpu", [0, 3, -1])
    assert blocks.blocks == 6 and blocks.layers == [0, 3, 6]
    ct2 = enc.WhisperEncoder(folder, "cpu", "int8", 1)
    mels = [ct2.mel(_speechlike(s, seed))[:, : 2 * ct2.used_frames(int(16000 * s))]
            for seed, s in enumerate((0.7, 2.3, 1.1))]
    together = blocks(mels)
    for mel, states in zip(mels, together):
        assert states.shape == (3, mel.shape[1] // 2, 512)
        np.testing.assert_allclose(states, blocks([mel])[0], rtol=1e-4, atol=5e-3)  # float32 sums in other orders; a padding leak is > 0.1
    assert not np.allclose(together[0][1], together[0][2][: len(together[0][1])], atol=0.1)


def test_extractor_pools_each_block_and_keeps_silence_flag(middle, tmp_path):
    tone = write_clip(tmp_path / "tone.mp4", seconds=1.0, tone_hz=300.0)
    silent = write_clip(tmp_path / "silent.mp4", seconds=1.4, audio="silent")
    items = [middle.prepare(Clip("t", video=str(tone))), middle.prepare(Clip("s", video=str(silent)))]
    out = middle.extract_batch(items)
    for item, o in zip(items, out):
        (frames,) = item.frames
        assert o["utterance"].shape == (4 * 512,) and o["utterance"].dtype == np.float32
        assert o["sequence"].shape == (-(-frames // 10), 512) and np.isfinite(o["sequence"]).all()
        states = middle.layer_encoder([item.inputs[0][:, : 2 * frames]])[0]  # (4, frames, 512)
        np.testing.assert_allclose(o["utterance"][:512], states[0].mean(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(o["utterance"][-512:], states[3].mean(axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(o["sequence"][0], states[:, :10].mean(axis=(0, 1)), rtol=1e-4, atol=1e-4)
    assert (out[0]["present"], out[1]["present"]) == (1.0, 0.0)
    assert "torch" in middle.versions() and "torch" not in get_extractor("whisper_encoder")({}).versions()


def test_long_audio_windows_continue(folder, tmp_path):
    wav = write_wav(tmp_path / "long.wav", seconds=25.0, tone_hz=180.0)
    extractor = get_extractor("whisper_encoder")({"model_path": str(folder), "layers": [3],
                                                 "window_s": 10.0, "max_seconds": 20.0})
    extractor.load("cpu")
    item = extractor.prepare(Clip("long", audio=str(wav)))
    (out,) = extractor.extract_batch([item])
    assert item.frames == [500, 500] and out["sequence"].shape == (100, 512)
    first = extractor.layer_encoder([item.inputs[0][:, :1000]])[0][0]
    np.testing.assert_allclose(out["sequence"][:50], enc.pool_sequence(first, 10), atol=1e-4)


def test_bad_layers_and_weights_say_what_to_do(folder, tmp_path):
    with pytest.raises(ConfigError, match="must not repeat"):
        get_extractor("whisper_encoder")({"layers": [3, 3]})
    with pytest.raises(WhisperWeightsError, match=r"blocks 1\.\.6"):
        WhisperLayers(folder / "model.bin", "cpu", [7])

    def model_bin(path: Path, spec: str, variables: list[tuple[str, np.ndarray, int]]) -> Path:
        def name(s: str) -> bytes:
            raw = s.encode() + b"\0"
            return struct.pack("<H", len(raw)) + raw
        body = struct.pack("<I", 6) + name(spec) + struct.pack("<II", 1, len(variables))
        for n, value, dtype in variables:
            data = value.tobytes()
            body += name(n) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
            body += struct.pack("<BI", dtype, len(data)) + data
        path.write_bytes(body)
        return path

    quantized = model_bin(tmp_path / "q.bin", "WhisperSpec",
                          [("encoder/conv1/weight", np.zeros((4, 2), np.int8), 1),
                           ("encoder/conv1/weight_scale", np.ones(4, np.float32), 0)])
    with pytest.raises(WhisperWeightsError, match="quantized weights.*--quantization float16"):
        read_encoder_weights(quantized)
    other = model_bin(tmp_path / "o.bin", "TransformerSpec", [])
    with pytest.raises(WhisperWeightsError, match="not a Whisper model"):
        read_encoder_weights(other)
    (tmp_path / "t.bin").write_bytes(struct.pack("<I", 6) + b"\x05")
    with pytest.raises(WhisperWeightsError, match="truncated"):
        read_encoder_weights(tmp_path / "t.bin")


def test_pad_to_30s_encodes_the_whole_window(folder, tmp_path):
    wav = write_wav(tmp_path / "short.wav", seconds=1.0, tone_hz=220.0)
    padded = get_extractor("whisper_encoder")({"model_path": str(folder), "layers": [4], "pad_to_30s": True})
    padded.load("cpu")
    item = padded.prepare(Clip("short", audio=str(wav)))
    (out,) = padded.extract_batch([item])
    (frames,) = item.frames
    full = padded.layer_encoder([item.inputs[0]])[0][0]  # (1500, 512): the real frames then the padding's
    assert full.shape == (1500, 512)
    np.testing.assert_allclose(out["utterance"], full[:frames].mean(axis=0), rtol=1e-4, atol=1e-4)
    short = padded.layer_encoder([item.inputs[0][:, : 2 * frames]])[0][0]
    assert not np.allclose(out["utterance"], short.mean(axis=0), atol=1e-2)  # the padding is attended to

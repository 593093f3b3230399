"""Pseudo-speakers: clips grouped by voice when the dataset names no speaker.

Speaker normalisation needs each clip's speaker, and the MER2025 layout has no such column.
The `speaker` store holds a voice embedding per clip (GE2E); clips are clustered on it
(spectral clustering on a 15-nearest-neighbour cosine graph). How many speakers there are is
not known, and one clustering's mistakes are costly: a speaker split by emotion loses that
emotion when each part is centred. So the clips are clustered at several resolutions (mean
cluster sizes of CLUSTER_SIZES clips) and the store is normalised under each, and the
results averaged: no count to guess, and one bad split weighs a fifth. Measured on unseen
RAVDESS actors (README "Fusion"): Whisper + LR 0.7229 plain, 0.8271 normalised per named
actor, 0.80-0.84 with these pseudo-speakers (any of 10-20 neighbours and of three size sets),
while any single clustering ranged 0.71-0.84 with the count.

The guard against cutting speakers by emotion: a clustering whose clusters follow the
emotion labels of the labelled clips (adjusted mutual information of cluster and label at
MAX_EMOTION_AMI or above) is dropped, and when every one is, coarser ones (down to 2) are
tried. On RAVDESS clusterings of 4-16 score 0.01-0.08, 24-64 clusters 0.15-0.25 (12 actors);
two actors alone in 2 / 3 / 5 clusters 0.00 / 0.06 / 0.28. So a corpus of a few speakers with
hundreds of clips each is clustered at its own scale instead of by emotion. This reads the
labelled clips' labels, once, to reject a clustering, never to choose a better one.

The clusters themselves are made from features only, over every clip with a voice, labelled
or not, as named speakers' statistics are.
"""

from __future__ import annotations

import warnings

import numpy as np

CLUSTER_SIZES = (160, 110, 80, 55, 40)  # mean clips per pseudo-speaker, one clustering each
COARSER = (8, 6, 4, 3, 2)  # tried when every size-based clustering follows the emotions
NEIGHBOURS = 15
MAX_CLUSTERED = 15000  # spectral clustering grows fast: 1 s at 3,000 clips, 44 s at 15,000, 6 min at 30,000 (2 cores)
MAX_EMOTION_AMI = 0.1  # a clustering whose clusters tell the emotion this well has cut speakers by emotion
MIN_LABELLED_FOR_GUARD = 30  # fewer labelled clips with a voice cannot tell, and the guard stands aside


def cluster_counts(n: int, min_clips: int) -> list[int]:
    """The numbers of clusters to try for `n` clips: one per CLUSTER_SIZES, at least 2 and with
    a mean cluster of at least `min_clips` clips; [] when `n` is too small for two such groups."""
    counts = {max(2, round(n / size)) for size in CLUSTER_SIZES}
    return sorted(k for k in counts if n / k >= min_clips)


def _cluster(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():  # distinct voices leave the neighbour graph in pieces: the good case
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        return SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=min(NEIGHBOURS, len(x) - 1),
                                  assign_labels="cluster_qr", random_state=seed).fit_predict(x)


def voice_groupings(embeddings: np.ndarray, present: np.ndarray, min_clips: int,
                    labels: list[str | None] | None = None, seed: int = 0) -> tuple[list[list[str | None]], str]:
    """(groupings, what): one grouping per kept resolution, each clip's pseudo-speaker
    (`voice<k>_<c>`, None where it has no voice), and a line for the log. No groupings when the
    clips with a voice are too few (or too many, MAX_CLUSTERED) to cluster, or when every
    clustering follows the emotion `labels` (None for unlabelled clips)."""
    from sklearn.metrics import adjusted_mutual_info_score

    rows = np.flatnonzero(present)
    counts = cluster_counts(len(rows), min_clips)
    if not counts or len(rows) > MAX_CLUSTERED:
        return [], f"{len(rows)} clips with a voice: too few (or too many) to cluster"
    x = embeddings[rows].astype(np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # cosine neighbours
    gold = np.array([labels[i] if labels is not None else None for i in rows], dtype=object)
    judged = gold != None  # noqa: E711 - elementwise
    guard = judged.sum() >= MIN_LABELLED_FOR_GUARD

    def follows_emotion(clusters: np.ndarray) -> float:
        return float(adjusted_mutual_info_score(gold[judged].astype(str), clusters[judged])) if guard else 0.0

    kept, dropped = {}, {}
    for tries in (counts, [k for k in COARSER if k < counts[0] and len(rows) / k >= min_clips]):
        for k in tries:
            clusters = _cluster(x, k, seed)
            ami = follows_emotion(clusters)
            (kept if ami < MAX_EMOTION_AMI else dropped)[k] = (clusters, ami)
        if kept:
            break
    out = []
    for k, (clusters, _) in sorted(kept.items()):
        groups: list[str | None] = [None] * len(embeddings)
        for i, label in zip(rows, clusters):
            groups[i] = f"voice{k}_{label}"
        out.append(groups)
    what = f"{len(rows)} clips with a voice clustered into {', '.join(map(str, sorted(kept))) or 'no'} pseudo-speakers"
    if dropped:
        what += (f" ({', '.join(f'{k} clusters: AMI {ami:.2f}' for k, (_, ami) in sorted(dropped.items()))} with the "
                 f"emotion labels, at or above {MAX_EMOTION_AMI}: cut by emotion, left out)")
    return out, what

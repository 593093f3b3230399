"""The six MER2025 emotion classes, in the order the challenge indexes them (0-5)."""

EMOTIONS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}


def scored_classes(gold) -> list[int]:
    """The class indices macro and per-class F1 are defined on: those a scored clip is labelled as.
    A class no clip has (a corpus without surprise, say) has F1 0/0 or, where a model predicts it,
    0 by construction: scikit-learn's `zero_division=0` over all six counted it as 0 and pulled the
    macro mean down for a class the data never had. Taken from the gold labels alone, the set does
    not move with the predictions, so macro F1 compares across runs and ablation rows; a wrong
    prediction of the absent class still costs the true class its recall. Weighted F1 is the same
    either way: such a class weighs 0."""
    return sorted({int(v) for v in gold})

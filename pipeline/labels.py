"""The six MER2025 emotion classes, in the order the challenge indexes them (0-5)."""

EMOTIONS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}


def scored_classes(gold, predicted) -> list[int]:
    """The class indices macro and per-class F1 are defined on: those a scored clip is labelled as or
    predicted as. A class absent from both has F1 0/0 (a corpus without surprise, say): scikit-learn's
    `zero_division=0` would count it as 0 and pull the macro mean down for a class the data never had,
    so the reports leave it out (as scikit-learn does when `labels` is not given). Weighted F1 is the
    same either way: such a class weighs 0."""
    return sorted({int(v) for v in gold} | {int(v) for v in predicted})

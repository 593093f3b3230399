"""The six MER2025 emotion classes, in the order the challenge indexes them (0-5)."""

EMOTIONS: tuple[str, ...] = ("neutral", "angry", "happy", "sad", "worried", "surprise")
EMOTION_INDEX: dict[str, int] = {name: i for i, name in enumerate(EMOTIONS)}

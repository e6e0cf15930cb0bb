"""Scores sentiment with a word list (a stand-in for a model)."""
from common import message, serve

NEGATIVE = {"furious", "angry", "failed", "broken", "terrible", "cancel", "worst", "third"}
POSITIVE = {"thanks", "thank", "great", "love", "arrived", "happy", "hi"}


def handle(item):
    words = {w.strip(".,!?").lower() for w in message(item).split()}
    score = (len(words & POSITIVE) - len(words & NEGATIVE)) / max(1, len(words & (POSITIVE | NEGATIVE)))
    label = "negative" if score < -0.2 else "positive" if score > 0.2 else "neutral"
    return {"sentiment": label, "score": round(score, 2)}


serve(handle)

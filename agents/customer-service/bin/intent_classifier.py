"""Classifies the intent by keywords (a stand-in for a model)."""
from common import message, serve

INTENTS = [("refund", ["refund"]), ("cancellation", ["cancel"]), ("delivery", ["deliver", "address", "order"])]


def handle(item):
    text = message(item).lower()
    for intent, keys in INTENTS:
        if any(k in text for k in keys):
            return {"intent": intent}
    return {"intent": "question"}


serve(handle)

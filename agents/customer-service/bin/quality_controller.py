"""Scores a draft: confident for calm customers, not for angry ones."""
from common import serve


def handle(item):
    draft = item.get("context", {}).get("response_generator", {})
    confidence = 0.55 if draft.get("sentiment") == "negative" else 0.93
    return {"approved": confidence > 0.8, "confidence": confidence}


serve(handle)

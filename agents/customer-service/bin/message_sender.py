"""Pretends to send the approved reply."""
from common import serve


def handle(item):
    draft = item.get("context", {}).get("response_generator", {}).get("draft", "")
    return {"sent": True, "characters": len(draft)}


serve(handle)

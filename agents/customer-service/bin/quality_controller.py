"""Scores a draft: confident for calm customers, not for angry ones."""
from common import reply, work_item

item = work_item()
draft = item.get("context", {}).get("response_generator", {})
confidence = 0.55 if draft.get("sentiment") == "negative" else 0.93
reply({"approved": confidence > 0.8, "confidence": confidence})

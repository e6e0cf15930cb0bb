"""Pretends to send the approved reply."""
from common import reply, work_item

item = work_item()
draft = item.get("context", {}).get("response_generator", {}).get("draft", "")
reply({"sent": True, "characters": len(draft)})

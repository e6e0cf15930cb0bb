"""Classifies the intent by keywords (a stand-in for a model)."""
from common import message, reply, work_item

text = message(work_item()).lower()
for intent, keys in [("refund", ["refund"]), ("cancellation", ["cancel"]), ("delivery", ["deliver", "address", "order"])]:
    if any(k in text for k in keys):
        break
else:
    intent = "question"
reply({"intent": intent})

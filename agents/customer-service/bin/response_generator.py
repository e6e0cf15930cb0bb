"""Drafts a reply from the sentiment and the retrieved knowledge."""
from common import serve


def handle(item):
    context = item.get("context", {})
    sentiment = context.get("sentiment_analyzer", {}).get("sentiment", "neutral")
    articles = context.get("knowledge_retriever", {}).get("articles", [])
    opening = "We are sorry for the trouble." if sentiment == "negative" else "Thanks for getting in touch!"
    return {"draft": " ".join([opening] + articles), "sentiment": sentiment}


serve(handle)

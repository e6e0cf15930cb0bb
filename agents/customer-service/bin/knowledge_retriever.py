"""Looks up help-centre articles for the intent found by intent_classifier."""
from common import serve

ARTICLES = {
    "refund": ["Refunds take 3-5 working days after approval."],
    "cancellation": ["You can cancel any order that has not shipped from your account page."],
    "delivery": ["Change the delivery address under Account > Addresses before the order ships."],
    "question": ["Our help centre answers most questions."],
}


def handle(item):
    intent = item.get("context", {}).get("intent_classifier", {}).get("intent", "question")
    return {"articles": ARTICLES.get(intent, ARTICLES["question"]), "intent": intent}


serve(handle)

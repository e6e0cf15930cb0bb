"""The example's knowledge_retriever written with the Python agent library (sdk/python): a
Kafka consumer of its own instead of a `command` run by `switchyard agent`. Run it in place of
`switchyard agent --card agents/customer-service/cards/knowledge_retriever.yaml` (same card, same
consumer group):

    pip install ./sdk/python
    SWITCHYARD_BOOTSTRAP_SERVERS=127.0.0.1:9092 python3 agents/customer-service/python/knowledge_retriever.py
"""
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "..", "sdk", "python"))
from switchyard_agent import Agent  # noqa: E402

ARTICLES = {
    "refund": ["Refunds take 3-5 working days after approval."],
    "cancellation": ["You can cancel any order that has not shipped from your account page."],
    "delivery": ["Change the delivery address under Account > Addresses before the order ships."],
    "question": ["Our help centre answers most questions."],
}

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
agent = Agent(
    "knowledge_retriever",
    bootstrap_servers=os.environ.get("SWITCHYARD_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
    topic_prefix=os.environ.get("SWITCHYARD_TOPIC_PREFIX", "switchyard"),
)


@agent.handler
def handle(item):
    intent = item.context.get("intent_classifier", {}).get("intent", "question")
    return {"articles": ARTICLES.get(intent, ARTICLES["question"]), "intent": intent, "by": "python"}


if __name__ == "__main__":
    agent.run()

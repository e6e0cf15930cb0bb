"""Write switchyard agents in Python.

An agent serves one card: it consumes the card's topic (``<prefix>.agent.<card>``) in the card's
consumer group, calls your function with each work item, and publishes a ``RESULT`` (or a
``FAILED``) task event with the same task, step and attempt to the task's partition of
``<prefix>.tasks``. It commits a work item's offset only after its answer is acknowledged,
answers a redelivered work item (same task, step and attempt) only once, finishes the item in
hand and publishes it on SIGTERM before it exits, continues the work item's trace context
(``traceparent``), and speaks JSON or Avro (Confluent wire format through a schema registry).

    from switchyard_agent import Agent, Failure

    agent = Agent("sentiment_analyzer", bootstrap_servers="127.0.0.1:9092")

    @agent.handler
    def handle(item):
        if not item.input.get("customer_message"):
            raise Failure("no message", retryable=False)
        return {"sentiment": "positive", "confidence": 0.9}

    agent.run()
"""
from .agent import Agent, Failure, Reply, WorkItem

__all__ = ["Agent", "Failure", "Reply", "WorkItem"]

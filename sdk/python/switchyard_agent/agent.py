"""The agent loop: consume, handle, publish, commit."""
import collections
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

log = logging.getLogger("switchyard_agent")


@dataclass
class WorkItem:
    """One unit of work, as the router sends it."""

    task_id: str
    tenant: str
    step_id: int
    attempt: int
    card: str
    input: Any
    context: Dict[str, Any] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    deadline: Optional[int] = None
    reply_partition: int = 0


@dataclass
class Reply:
    """What a handler may return instead of a plain dict: the payload with its confidence and
    usage (``{"tokens_in", "tokens_out", "cost"}``)."""

    payload: Dict[str, Any]
    confidence: Optional[float] = None
    usage: Optional[Dict[str, Any]] = None


class Failure(Exception):
    """Raise it to publish a FAILED event. ``retryable=False`` asks the router not to try again
    (the card's fallback still applies); any other exception is a retryable failure."""

    def __init__(self, reason: str, retryable: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class _Json:
    def decode(self, topic, data):
        return json.loads(data)

    def encode(self, topic, event):
        return json.dumps(event).encode()


class _Avro:
    """Confluent wire format through a schema registry: TaskEvent and WorkItem records whose
    payloads are JSON text, as the router writes them."""

    def __init__(self, registry_url, task_event_schema):
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        registry = SchemaRegistryClient({"url": registry_url})
        self._context = lambda topic: SerializationContext(topic, MessageField.VALUE)
        self._decoder = AvroDeserializer(registry)
        self._encoder = AvroSerializer(
            registry, task_event_schema, conf={"auto.register.schemas": False, "use.latest.version": True}
        )

    def decode(self, topic, data):
        item = self._decoder(data, self._context(topic))
        item["input"] = json.loads(item["input"])
        item["context"] = {k: json.loads(v) for k, v in (item.get("context") or {}).items()}
        return item

    def encode(self, topic, event):
        event = dict(event, payload=json.dumps(event["payload"]).encode())
        return self._encoder(event, self._context(topic))


class Agent:
    """An agent microservice for one card.

    ``card`` is the card's name; ``topic_prefix`` the deployment's prefix (default
    ``switchyard``). ``encoding`` is ``json`` or ``avro`` (then ``registry_url`` and
    ``task_event_schema``, the text of ``schemas/TaskEvent.avsc``). ``config`` adds librdkafka
    properties (SASL, TLS). ``dedupe`` is how many answered (task, step, attempt) keys are
    remembered.
    """

    def __init__(
        self,
        card: str,
        bootstrap_servers: str = "127.0.0.1:9092",
        topic_prefix: str = "switchyard",
        encoding: str = "json",
        registry_url: Optional[str] = None,
        task_event_schema: Optional[str] = None,
        config: Optional[Dict[str, str]] = None,
        dedupe: int = 100_000,
    ):
        self.card = card
        self.inbox = f"{topic_prefix}.agent.{card}"
        self.tasks = f"{topic_prefix}.tasks"
        base = {"bootstrap.servers": bootstrap_servers, **(config or {})}
        self._consumer_config = {
            **base,
            "group.id": f"{topic_prefix}.agent.{card}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
        self._producer = Producer({**base, "enable.idempotence": True, "acks": "all"})
        if encoding == "avro":
            if not registry_url or not task_event_schema:
                raise ValueError("encoding avro needs registry_url and task_event_schema")
            self._codec = _Avro(registry_url, task_event_schema)
        elif encoding == "json":
            self._codec = _Json()
        else:
            raise ValueError(f"encoding {encoding!r}: use json or avro")
        self._handler: Optional[Callable[[WorkItem], Any]] = None
        self._answered = collections.OrderedDict()
        self._dedupe = dedupe
        self._stopping = False
        self.handled = 0

    def handler(self, function: Callable[[WorkItem], Any]):
        """Decorator: the function that handles each work item. It returns a dict (the
        result's payload; a top-level ``confidence`` becomes the result's) or a ``Reply``, or
        raises ``Failure``."""
        self._handler = function
        return function

    def stop(self, *_):
        """Finish the work item in hand, publish and commit it, then return from ``run``."""
        self._stopping = True

    def run(self, idle_exit: Optional[float] = None):
        """Consume until SIGTERM or SIGINT (or ``stop()``; or ``idle_exit`` seconds without a
        work item). Signals are handled when it runs on the main thread."""
        if self._handler is None:
            raise RuntimeError("no handler: decorate a function with @agent.handler")
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        consumer = Consumer(self._consumer_config)
        consumer.subscribe([self.inbox])
        log.info("agent for %s consuming %s", self.card, self.inbox)
        last = time.monotonic()
        try:
            while not self._stopping:
                message = consumer.poll(0.2)
                if message is None:
                    if idle_exit is not None and time.monotonic() - last > idle_exit:
                        break
                    continue
                if message.error():
                    log.warning("kafka: %s", message.error())
                    continue
                last = time.monotonic()
                self._one(message)
                consumer.commit(message=message, asynchronous=False)
        finally:
            self._producer.flush(30)
            consumer.close()
            log.info("agent for %s stopped", self.card)

    def _one(self, message):
        try:
            raw = self._codec.decode(message.topic(), message.value())
            item = WorkItem(**{k: raw.get(k) for k in WorkItem.__dataclass_fields__ if k in raw})
        except Exception as e:  # noqa: BLE001 - a record we cannot read is skipped, not fatal
            log.error("skipping undecodable work item at %s[%d]@%d: %s",
                      message.topic(), message.partition(), message.offset(), e)
            return
        key = (item.task_id, item.step_id, item.attempt)
        if key in self._answered:
            log.info("work item %s answered already; not handled again", key)
            return
        headers = dict(message.headers() or [])
        try:
            reply = self._handler(item)
            if not isinstance(reply, Reply):
                reply = Reply(payload=reply, confidence=(reply or {}).get("confidence"))
            if not isinstance(reply.payload, dict):
                raise Failure("the handler returned something that is not a dict")
            kind, payload = "RESULT", reply.payload
        except Failure as f:
            kind, payload, reply = "FAILED", {"error": f.reason}, Reply({})
            if not f.retryable:
                payload["retryable"] = False
        except Exception as e:  # noqa: BLE001 - any error of the handler is a retryable failure
            kind, payload, reply = "FAILED", {"error": f"{type(e).__name__}: {e}"}, Reply({})
        self._publish(item, kind, payload, reply, headers.get("traceparent"))
        self._answered[key] = True
        if len(self._answered) > self._dedupe:
            self._answered.popitem(last=False)
        self.handled += 1

    def _publish(self, item, kind, payload, reply, traceparent):
        event = {
            "event_id": str(uuid.uuid4()),
            "task_id": item.task_id,
            "tenant": item.tenant,
            "kind": kind,
            "source": self.card,
            "step_id": item.step_id,
            "attempt": item.attempt,
            "payload": payload,
            "content_type": "application/json",
            "confidence": reply.confidence,
            "usage": reply.usage,
            "priority": 0,
            "deadline": None,
            "labels": {},
            "created_at": int(time.time() * 1000),
        }
        errors = []
        headers = [("traceparent", traceparent)] if traceparent else None
        self._producer.produce(
            self.tasks,
            key=item.task_id.encode(),
            value=self._codec.encode(self.tasks, event),
            partition=item.reply_partition,
            headers=headers,
            on_delivery=lambda err, _msg: err and errors.append(err),
        )
        if self._producer.flush(30) != 0 or errors:
            raise KafkaException(errors[0] if errors else "the result was not delivered within 30s")

"""Interop check with Confluent's own Python client (confluent-kafka's AvroSerializer and
AvroDeserializer): submit a task in Avro, then decode the work item the router wrote.

Usage: confluent_avro_client.py BOOTSTRAP REGISTRY_URL PREFIX TASK_ID SCHEMA_FILE
Prints the decoded work item as one JSON line.
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

bootstrap, registry_url, prefix, task_id, schema_file = sys.argv[1:6]
registry = SchemaRegistryClient({"url": registry_url})
tasks = f"{prefix}.tasks"
inbox = f"{prefix}.agent.sentiment_analyzer"

# Look the registered schema up (POST /subjects/{s}) rather than registering a new one.
with open(schema_file) as f:
    schema = f.read()
serializer = AvroSerializer(registry, schema, conf={"auto.register.schemas": False})
event = {
    "event_id": str(uuid.uuid4()),
    "task_id": task_id,
    "tenant": "default",
    "kind": "SUBMITTED",
    "source": "python",
    "step_id": None,
    "attempt": None,
    "payload": json.dumps({"customer_message": "hello from python"}).encode(),
    "content_type": "application/json",
    "confidence": None,
    "usage": None,
    "priority": 0,
    "deadline": None,
    "labels": {"client": "confluent-kafka"},
    "created_at": int(time.time() * 1000),
}
producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
value = serializer(event, SerializationContext(tasks, MessageField.VALUE))
producer.produce(tasks, key=task_id.encode(), value=value)
if producer.flush(30) != 0:
    sys.exit("the task was not delivered")

deserializer = AvroDeserializer(registry)
consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": f"interop-{uuid.uuid4()}",
    "auto.offset.reset": "earliest",
})
consumer.subscribe([inbox])
deadline = time.time() + 60
while time.time() < deadline:
    message = consumer.poll(1.0)
    if message is None or message.error():
        continue
    item = deserializer(message.value(), SerializationContext(inbox, MessageField.VALUE))
    if item["task_id"] != task_id:
        continue
    item["input"] = json.loads(item["input"])
    print(json.dumps(item))
    consumer.close()
    sys.exit(0)
sys.exit("no work item arrived within 60s")

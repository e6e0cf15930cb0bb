"""The Python agent library against the real broker and the switchyard router."""
import json
import pathlib
import signal
import subprocess
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer

from conftest import BOOTSTRAP, ROOT, eventually
from switchyard_agent import Agent, Failure

HERE = pathlib.Path(__file__).resolve().parent


def worker_workflow(tmp):
    """One card, `worker`, whose answer completes the task."""
    (tmp / "wf" / "cards").mkdir(parents=True)
    (tmp / "wf" / "cards" / "worker.yaml").write_text("name: worker\nruntime: {kind: handler}\n")
    (tmp / "wf" / "rules.yaml").write_text(
        "rules:\n  - { id: start, when: { kind: SUBMITTED }, then: { route: [worker] } }\n"
        "  - { id: done, when: { source: worker }, then: complete }\n")
    return tmp / "wf"


def work_item(task_id, step_id=1, attempt=1):
    return {"task_id": task_id, "tenant": "default", "step_id": step_id, "attempt": attempt,
            "card": "worker", "input": {"n": 1}, "context": {}, "labels": {}, "deadline": None,
            "reply_partition": 0}


def read(topic, count, timeout=30):
    """The first `count` records of `topic`, decoded as JSON."""
    consumer = Consumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"read-{uuid.uuid4()}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    out, deadline = [], time.time() + timeout
    while len(out) < count and time.time() < deadline:
        m = consumer.poll(0.5)
        if m is not None and not m.error():
            out.append((m, m.value()))
    consumer.close()
    return out


def test_a_python_agent_completes_its_step_in_the_example_workflow(stack, tmp_path):
    """The example's knowledge_retriever written with the library (agents/customer-service/python)
    serves its card while `switchyard agent` serves the others."""
    workflow = "agents/customer-service"
    stack.run("topics", "apply", "--workflow", workflow)
    stack.spawn("router", "router", "--workflow", workflow, "--http-addr", "127.0.0.1:0")
    for card in ["sentiment_analyzer", "intent_classifier", "response_generator",
                 "quality_controller", "message_sender"]:
        stack.spawn(card, "agent", "--card", f"{workflow}/cards/{card}.yaml")
    log = open(tmp_path / "python-agent.log", "w")
    python = subprocess.Popen(
        [sys.executable, str(ROOT / workflow / "python" / "knowledge_retriever.py")],
        env={**__import__("os").environ, "SWITCHYARD_BOOTSTRAP_SERVERS": BOOTSTRAP,
             "SWITCHYARD_TOPIC_PREFIX": stack.prefix},
        stdout=log, stderr=log)
    stack.children.append(python)
    task = stack.run("submit", "--payload", json.dumps({"customer_message": "Where is my order? Thanks"})).strip()
    timeline = eventually(
        lambda: (t := stack.timeline(task)) and any("COMPLETED" in json.dumps(d[1]["decision"]) for d in t) and t,
        "the task to complete")
    answered = [d[1]["event"] for d in timeline
                if d[1].get("event") and d[1]["event"]["source"] == "knowledge_retriever"]
    assert answered and answered[0]["payload"]["by"] == "python"
    assert answered[0]["payload"]["intent"] == "delivery"
    python.send_signal(signal.SIGTERM)
    assert python.wait(30) == 0, "the agent stops cleanly on SIGTERM"


def test_a_redelivered_work_item_is_handled_once(stack, tmp_path):
    stack.run("topics", "apply", "--workflow", str(worker_workflow(tmp_path)))
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    inbox = f"{stack.prefix}.agent.worker"
    for item in [work_item("dup-1"), work_item("dup-1"), work_item("dup-1", attempt=2)]:
        producer.produce(inbox, key=b"dup-1", value=json.dumps(item).encode())
    assert producer.flush(30) == 0
    calls = []
    agent = Agent("worker", bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix)

    @agent.handler
    def handle(item):
        calls.append((item.task_id, item.step_id, item.attempt))
        if item.attempt == 2:
            raise Failure("no such order", retryable=False)
        return {"ok": True, "confidence": 0.8}

    agent.run(idle_exit=3)
    assert calls == [("dup-1", 1, 1), ("dup-1", 1, 2)], "the redelivered attempt 1 was not handled again"
    answers = [json.loads(v) for _, v in read(f"{stack.prefix}.tasks", 2)]
    assert [(a["kind"], a["attempt"]) for a in answers] == [("RESULT", 1), ("FAILED", 2)]
    assert answers[0]["confidence"] == 0.8 and answers[0]["source"] == "worker"
    assert answers[1]["payload"] == {"error": "no such order", "retryable": False}


def test_sigterm_finishes_the_item_in_hand_and_publishes_it_before_exiting(stack, tmp_path):
    stack.run("topics", "apply", "--workflow", str(worker_workflow(tmp_path)))
    log = open(tmp_path / "slow.log", "w+")
    child = subprocess.Popen([sys.executable, str(HERE / "slow_agent.py"), BOOTSTRAP, stack.prefix],
                             stderr=log, stdout=log)
    try:
        producer = Producer({"bootstrap.servers": BOOTSTRAP})
        producer.produce(f"{stack.prefix}.agent.worker", key=b"slow-1", value=json.dumps(work_item("slow-1")).encode())
        assert producer.flush(30) == 0
        eventually(lambda: "handling slow-1" in (tmp_path / "slow.log").read_text(), "the item in hand")
        child.send_signal(signal.SIGTERM)
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
    assert "exited cleanly" in (tmp_path / "slow.log").read_text()
    answers = [json.loads(v) for _, v in read(f"{stack.prefix}.tasks", 1)]
    assert answers and answers[0]["payload"] == {"done": "slow-1"} and answers[0]["kind"] == "RESULT"


def test_an_avro_work_item_round_trips_through_the_registry(stack, tmp_path):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    workflow = worker_workflow(tmp_path)
    stack.run("topics", "apply", "--workflow", str(workflow))
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry = f"http://127.0.0.1:{port}"
    stack.spawn("registry", "registry", "--listen", f"127.0.0.1:{port}", "--topic", f"{stack.prefix}._schemas")
    eventually(lambda: __import__("conftest").answers(f"127.0.0.1:{port}"), "the registry")
    stack.run("--registry-url", registry, "schemas", "register", "--workflow", str(workflow))
    client = SchemaRegistryClient({"url": registry})
    inbox, tasks = f"{stack.prefix}.agent.worker", f"{stack.prefix}.tasks"
    item = dict(work_item("avro-1"), input=json.dumps({"n": 7}).encode(), context={})
    serializer = AvroSerializer(client, (ROOT / "schemas" / "WorkItem.avsc").read_text(),
                                conf={"auto.register.schemas": False, "use.latest.version": True})
    producer = Producer({"bootstrap.servers": BOOTSTRAP})
    producer.produce(inbox, key=b"avro-1", value=serializer(item, SerializationContext(inbox, MessageField.VALUE)))
    assert producer.flush(30) == 0
    agent = Agent("worker", bootstrap_servers=BOOTSTRAP, topic_prefix=stack.prefix, encoding="avro",
                  registry_url=registry, task_event_schema=(ROOT / "schemas" / "TaskEvent.avsc").read_text())

    @agent.handler
    def handle(item):
        return {"doubled": item.input["n"] * 2}

    agent.run(idle_exit=3)
    records = read(tasks, 1)
    assert records and records[0][1][0] == 0, "Confluent wire format: magic byte 0"
    answer = AvroDeserializer(client)(records[0][1], SerializationContext(tasks, MessageField.VALUE))
    assert answer["kind"] == "RESULT" and answer["task_id"] == "avro-1"
    assert json.loads(answer["payload"]) == {"doubled": 14}

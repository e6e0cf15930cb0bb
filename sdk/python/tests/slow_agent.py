"""A Python agent whose handler takes 3 seconds; used by the SIGTERM test.
Usage: slow_agent.py BOOTSTRAP PREFIX"""
import logging
import sys
import time

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
from switchyard_agent import Agent  # noqa: E402

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
agent = Agent("worker", bootstrap_servers=sys.argv[1], topic_prefix=sys.argv[2])


@agent.handler
def handle(item):
    print(f"handling {item.task_id}", file=sys.stderr, flush=True)
    time.sleep(3)
    return {"done": item.task_id}


agent.run()
print("exited cleanly", file=sys.stderr, flush=True)

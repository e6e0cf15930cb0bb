"""Shared helpers of the example agents: read one work item on stdin, print one JSON result."""
import json
import sys


def work_item():
    return json.load(sys.stdin)


def reply(result):
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


def message(item):
    return str(item.get("input", {}).get("customer_message", ""))

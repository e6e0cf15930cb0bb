"""Shared helpers of the example agents.

`serve(handle)` runs `handle(work_item) -> dict` either once (the work item on stdin, one JSON
result on stdout: the `command` runtime's default) or, with `--lines` or under a card with
`long_lived: true` (which sets SWITCHYARD_LONG_LIVED=1), for every line of stdin, answering
one JSON line each.
"""
import json
import os
import sys


def message(item):
    return str(item.get("input", {}).get("customer_message", ""))


def serve(handle):
    if "--lines" in sys.argv or os.environ.get("SWITCHYARD_LONG_LIVED") == "1":
        for line in sys.stdin:
            if line.strip():
                sys.stdout.write(json.dumps(handle(json.loads(line))) + "\n")
                sys.stdout.flush()
    else:
        json.dump(handle(json.load(sys.stdin)), sys.stdout)
        sys.stdout.write("\n")

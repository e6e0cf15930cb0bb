"""Fixtures: the real broker, the switchyard binary, topics with a prefix of each test's own."""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "sdk" / "python"))

BOOTSTRAP = os.environ.get("SWITCHYARD_TEST_BOOTSTRAP", "127.0.0.1:9092")


def switchyard_bin():
    path = pathlib.Path(os.environ.get("SWITCHYARD_BIN", ROOT / "target" / "debug" / "switchyard"))
    if not path.exists():
        pytest.fail(f"no switchyard binary at {path}: run `cargo build` or set SWITCHYARD_BIN")
    return str(path)


def answers(address):
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture
def prefix():
    if not answers(BOOTSTRAP):
        pytest.fail(f"no Kafka broker at {BOOTSTRAP}: start it with `scripts/start-broker` "
                    "or set SWITCHYARD_TEST_BOOTSTRAP")
    return f"t-py-{uuid.uuid4().hex[:8]}"


class Stack:
    """The switchyard binary with this test's broker and prefix; processes it started are
    stopped (by PID) at the end."""

    def __init__(self, prefix, tmp):
        self.prefix, self.tmp, self.children = prefix, tmp, []

    def command(self, *args):
        return [switchyard_bin(), "--bootstrap-servers", BOOTSTRAP, "--topic-prefix", self.prefix, *args]

    def run(self, *args):
        done = subprocess.run(self.command(*args), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def spawn(self, name, *args, env=None):
        log = open(self.tmp / f"{name}.log", "w")
        child = subprocess.Popen(self.command(*args), cwd=ROOT, stdout=log, stderr=log,
                                 env={**os.environ, **(env or {})})
        self.children.append(child)
        return child

    def timeline(self, task_id):
        """The task's decisions as `audit --json` gives them; none while it has none."""
        done = subprocess.run(self.command("audit", task_id, "--json"), cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        return json.loads(done.stdout)["decisions"] if done.returncode == 0 else []

    def stop(self):
        for child in self.children:
            child.kill()
            child.wait()


@pytest.fixture
def stack(prefix, tmp_path):
    s = Stack(prefix, tmp_path)
    yield s
    s.stop()


def eventually(check, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")

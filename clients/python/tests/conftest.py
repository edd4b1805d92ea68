"""A real herd broker per test, started from the binary cargo built."""

import json
import os
import pathlib
import signal
import socket
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
BIN = os.environ.get("HERD_BIN", str(ROOT / "target" / "debug" / "herd"))

BASIC = """
[[evaluator]]
fn = "default"
kind = "simulate"
threads = 16
timeout_ms = 2000
max_sleep_ms = 5000
[[evaluator]]
fn = "echo"
kind = "echo"
threads = 2
[[evaluator]]
fn = "embed"
kind = "remote"
"""


class Broker:
    def __init__(self, tmp_path, toml=BASIC, port=0):
        self.config = tmp_path / f"herd-{port}.toml"
        self.config.write_text(toml)
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", str(self.config), "--listen", f"127.0.0.1:{port}", "--log-format", "json"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in self.proc.stderr:
            fields = json.loads(line).get("fields", {})
            if "addr" in fields:
                self.addr = fields["addr"]
                break
        else:
            raise RuntimeError("herd serve did not start")
        self.port = int(self.addr.rsplit(":", 1)[1])
        self.url = f"ws://{self.addr}/ws"

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path)
    yield b
    b.stop()


@pytest.fixture
def make_broker(tmp_path):
    made = []

    def make(toml=BASIC, port=0):
        b = Broker(tmp_path, toml, port)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

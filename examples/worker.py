#!/usr/bin/env python3
"""A herd process evaluator in plain Python (standard library only).

Copy this file, replace `compute`, and name it in a config section:

    [[evaluator]]
    fn = "wordstats"
    kind = "process"
    command = ["python3", "examples/worker.py"]
    threads = 4          # one copy of this program per thread
    timeout_ms = 30000

herd starts one copy of this program per evaluator thread and keeps it
running. It writes one task per line on the program's stdin:

    {"key": "<32 hex>", "fn": "<name>", "input": <any JSON>}

and reads exactly one line back on stdout for each task:

    {"output": <any JSON>}      or      {"error": "<message>"}

Anything meant for humans goes to stderr: herd copies it to its log. A task
that raises is answered with {"error": ...}; the program keeps serving.
"""

import json
import sys


def compute(fn, value):
    """The computation: deterministic in (fn, value), since herd caches by them."""
    text = value.get("text", "") if isinstance(value, dict) else json.dumps(value)
    words = text.split()
    return {
        "characters": len(text),
        "words": len(words),
        "longest": max(words, key=len) if words else None,
    }


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            task = json.loads(line)
            reply = {"output": compute(task["fn"], task["input"])}
        except Exception as error:  # one bad task must not stop the worker
            reply = {"error": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A process evaluator that misbehaves on request, for herd's tests.

Input member `mode`: ok (default), error, crash, garbage, hang, stderr,
gate (answer once something is written to the named pipe `gate`),
progress (report `{"step": i}` for i in 1..`reports` before answering,
waiting on the named pipe `gate` before step `hold_before`). `sleep` (seconds) delays the answer. Environment: PIDFILE (append own pid),
CALLS (append each task's key), FAIL_AT_START_IF (exit at once while that
file exists).
"""

import json
import os
import sys
import time

if os.environ.get("PIDFILE"):
    with open(os.environ["PIDFILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
flag = os.environ.get("FAIL_AT_START_IF")
if flag and os.path.exists(flag):
    sys.stderr.write("refusing to start\n")
    sys.exit(2)



def wait_for(path):
    # A named pipe: opening it blocks until the test opens it to write, and
    # reading ends when the test has written and closed it.
    with open(path) as gate:
        gate.read()


for line in sys.stdin:
    task = json.loads(line)
    value = task["input"]
    mode = value.get("mode", "ok")
    if os.environ.get("CALLS"):
        with open(os.environ["CALLS"], "a") as f:
            f.write(task["key"] + "\n")
    time.sleep(value.get("sleep", 0))
    if mode == "crash":
        sys.stderr.write("crashing on purpose\n")
        sys.stderr.flush()
        os._exit(3)
    if mode == "gate":
        wait_for(value["gate"])
    if mode == "progress":
        for step in range(1, value.get("reports", 3) + 1):
            if step == value.get("hold_before"):
                wait_for(value["gate"])
            print(json.dumps({"progress": {"step": step}}), flush=True)
    if mode == "garbage":
        print("this is not json", flush=True)
        continue
    if mode == "hang":
        time.sleep(3600)
    if mode == "stderr":
        sys.stderr.write("a note for the log\n")
        sys.stderr.flush()
    if mode == "error":
        reply = {"error": "bad input"}
    else:
        reply = {"output": {"echo": value, "fn": task["fn"]}}
    print(json.dumps(reply), flush=True)

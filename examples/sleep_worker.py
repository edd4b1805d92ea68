#!/usr/bin/env python3
"""A JSON-lines child (the `process` evaluator protocol) that stands in for
a 15-30 ms computation, the time derived from the key exactly as the
builtin `sleep` evaluator derives it (15 ms plus the low four bits of the
key's first byte). Used to benchmark remote workers:

    herd work --fn remote --concurrency 8 -- python3 examples/sleep_worker.py
"""

import json
import sys
import time

for line in sys.stdin:
    task = json.loads(line)
    time.sleep((15 + int(task["key"][1], 16)) / 1000)
    print(json.dumps({"output": {"key": task["key"], "bytes": len(line)}}), flush=True)

"""Run code in another Python process without paying a process start each time.

A format's saved export must load where nothing of the process that wrote it exists: its
objects, its caches, its registrations made on the fly. A new interpreter per check gives that
but costs ~4 s (starting Python, importing torch and discq), and the conformance suite makes
one such check per format. `run_elsewhere(body)` sends `body` to one long-lived worker process
(started on first use with `torch` and `discq` imported, as every check's preamble did) that
runs each body in a namespace of its own. The worker never holds the test process's objects;
what it shares between checks is only what `import discq` registers anyway. A crash or a
timeout ends the worker (the next check starts a new one) and fails the check with its output.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import textwrap

MARK = "\x00discq-result "
_WORKER = r"""
import json, sys, traceback
import torch, discq
for line in sys.stdin:
    try:
        exec(compile(json.loads(line), "<check>", "exec"),
             {"__name__": "__check__", "torch": torch, "discq": discq})
        result = {"ok": True}
    except BaseException:
        result = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush()
    sys.stdout.write(%r + json.dumps(result) + "\n")
    sys.stdout.flush()
""" % MARK

_proc: subprocess.Popen | None = None


def _worker() -> subprocess.Popen:
    global _proc
    if _proc is None or _proc.poll() is not None:
        _proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        atexit.register(_proc.kill)
    return _proc


def _stop(proc: subprocess.Popen) -> None:
    global _proc
    proc.kill()
    proc.wait()
    _proc = None


def run_elsewhere(body: str, timeout: float = 600) -> str:
    """Run `body` (dedented) in the worker; its output, or AssertionError with the worker's
    output and traceback."""
    proc = _worker()
    proc.stdin.write((json.dumps(textwrap.dedent(body)) + "\n").encode())
    out, fd = b"", proc.stdout.fileno()
    while MARK.encode() not in out:
        # raw reads of the pipe (a buffered reader could hold the answer while select waits)
        ready, _, _ = select.select([fd], [], [], timeout)
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:  # a timeout, or the worker died (a crash in native code)
            _stop(proc)
            raise AssertionError("the other process ended or timed out:\n" +
                                 out.decode(errors="replace")[-3000:])
        out += chunk
    while not out.endswith(b"\n"):  # the rest of the result line
        out += os.read(fd, 65536)
    text, _, line = out.decode().rpartition(MARK)
    result = json.loads(line)
    assert result["ok"], text[-1000:] + result["error"][-3000:]
    return text

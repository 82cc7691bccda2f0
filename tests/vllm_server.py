"""A real vLLM OpenAI server for the tests that need one (run in the venv of scripts/vllm_venv.sh).

:func:`start_server` starts ``python -m vllm.entrypoints.openai.api_server`` on a free loopback port, in a
session of its own, and waits for ``/health`` (bounded by ``START_TIMEOUT_S``); :func:`stop_server` stops it by
its PID (SIGTERM, then SIGKILL) and kills its process group, so no engine-core process outlives a test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

START_TIMEOUT_S = 300  # the server's own start: about 30-60 s on 2 busy cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, n: int = 40) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return "(no log)"


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    try:  # the engine-core process it started, should it outlive the server (same process group, its PID)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_server(model_dir, root, name: str, extra=()):
    """``(proc, url, seconds to /health)`` of a vLLM OpenAI server for ``model_dir`` serving it as ``name`` on
    a free loopback port (fp32, eager, 256 positions, 4 sequences; ``extra`` arguments appended); its log is
    ``root/server-<port>.log``. A server that exits or does not answer in time fails the test with its log."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: engine core in its own process
    log = root / f"server-{port}.log"
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "256",
           *extra]  # fmt: skip
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log_tail(log)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return proc, url, time.monotonic() - t0
            except OSError:
                pass
            if time.monotonic() > t0 + START_TIMEOUT_S:
                pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{log_tail(log)}")
            time.sleep(1)
    except BaseException:
        stop_server(proc)
        raise

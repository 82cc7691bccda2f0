"""vLLM's OpenAI server with a proxy-tuned model directory, asked by the official ``openai`` client: a completion,
a streamed one, top-5 logprobs equal to ``log_softmax(proxytune.combine(...))`` on the same prefix, and 16
concurrent requests. The server runs on 127.0.0.1 (a free port), started here and stopped by its PID.

    .venv-vllm/bin/python -P -m pytest -m vllm tests/test_vllm_server.py
"""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("vLLM or openai is not installed (build the venv with scripts/vllm_venv.sh)", allow_module_level=True)

from test_vllm import combined_logprobs, make_dir, save_family  # noqa: E402

pytestmark = pytest.mark.vllm

START_TIMEOUT_S = 300  # the server's own start: about 30-60 s on 2 busy cores
REQUEST_TIMEOUT_S = 120
WEIGHT = 0.5
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "proxy tuning steers a large model with"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path, n: int = 40) -> str:
    try:
        return "\n".join(open(path, errors="replace").read().splitlines()[-n:])
    except OSError:
        return "(no log)"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("vllm_server_models"))


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    """``(base_url, model directory)`` of a running server; stopped (SIGTERM, then SIGKILL) after the module."""
    import urllib.request

    root = tmp_path_factory.mktemp("vllm_server")
    model_dir = make_dir(root / "pt", family["base"], [(family["expert"], family["anti"], WEIGHT)])
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users run it: engine core in its own process
    log = root / "server.log"
    cmd = [sys.executable, "-P", "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "proxy", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "256",
           "--max-logprobs", "5"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(2)
        yield url, model_dir
    finally:
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


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S, max_retries=0)


@pytest.fixture(scope="module")
def tok(family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(family["base"])


def _ids(tokens) -> list:
    """``["token_id:212", ...]`` (``return_tokens_as_token_ids``) -> ``[212, ...]``."""
    return [int(t.split(":", 1)[1]) for t in tokens]


def test_completion_logprobs_equal_combine(client, family, tok):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="proxy", prompt=prompt, max_tokens=6, temperature=0, logprobs=5,
                                      extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
        choice = r.choices[0]
        lp = choice.logprobs
        tokens = _ids(lp.tokens)
        assert 1 <= len(tokens) <= 6 and len(lp.top_logprobs) == len(tokens)
        prefix = tok(prompt).input_ids
        for token, top in zip(tokens, lp.top_logprobs):
            ref = combined_logprobs(family, ("base", "expert", "anti"), prefix, [WEIGHT])
            assert token == int(ref.argmax())  # greedy: the proxy-tuned argmax
            top = {int(k.split(":", 1)[1]): v for k, v in top.items()}
            assert len(top) == 5 and set(top) == set(ref.topk(5).indices.tolist())
            for t, v in top.items():
                assert v == pytest.approx(float(ref[t]), abs=2e-4)
            prefix.append(token)
        # the text is those tokens' (vLLM holds back a last incomplete UTF-8 sequence: random weights draw bytes)
        assert choice.text.rstrip("\ufffd") == tok.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def test_streamed_completion_matches_the_plain_one(client):
    prompt = PROMPTS[1]
    plain = client.completions.create(model="proxy", prompt=prompt, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="proxy", prompt=prompt, max_tokens=12, temperature=0, stream=True))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert plain.usage.completion_tokens >= 1


def test_sixteen_concurrent_requests_complete(client):
    def ask(i):
        return client.completions.create(model="proxy", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=8,
                                         temperature=0.8, seed=i)  # fmt: skip

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16)))
    assert time.monotonic() - t0 < REQUEST_TIMEOUT_S
    assert len(results) == 16
    for r in results:
        assert r.choices[0].finish_reason in ("length", "stop")
        assert 1 <= r.usage.completion_tokens <= 8
    # a seeded request asked again alone draws what it drew among the 16
    again = ask(3)
    assert again.choices[0].text == results[3].choices[0].text

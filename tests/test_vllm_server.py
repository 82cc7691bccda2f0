"""vLLM's OpenAI server with a proxy-tuned model directory, asked by the official ``openai`` client: a completion,
a streamed one, top-5 logprobs equal to ``log_softmax(proxytune.combine(...))`` on the same prefix, and 16
concurrent requests. The server runs on 127.0.0.1 (a free port), started here and stopped by its PID.

    .venv-vllm/bin/python -P -m pytest -m vllm tests/test_vllm_server.py
"""

import importlib.util
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("vLLM or openai is not installed (build the venv with scripts/vllm_venv.sh)", allow_module_level=True)

from test_vllm import combined_logprobs, make_dir, save_family  # noqa: E402
from vllm_server import start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.vllm

REQUEST_TIMEOUT_S = 120
WEIGHT = 0.5
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "proxy tuning steers a large model with"]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("vllm_server_models"))


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    """``(base_url, model directory)`` of a running server; stopped (SIGTERM, then SIGKILL) after the module."""
    root = tmp_path_factory.mktemp("vllm_server")
    model_dir = make_dir(root / "pt", family["base"], [(family["expert"], family["anti"], WEIGHT)])
    proc, url, _ = start_server(model_dir, root, "proxy", ["--max-logprobs", "5"])
    try:
        yield url, model_dir
    finally:
        stop_server(proc)


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

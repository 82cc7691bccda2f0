"""``proxytune.remote.client.CompletionsClient`` against an in-process fake server (``httpx.MockTransport``) and
a dead port: parsing, retries with backoff (429, 503, dropped connections), whole responses only, unknown
models, the server's own 400 message, the API key kept out of every message, one clear error for a dead URL.
The real server is tests/test_remote_server.py (marker ``vllm``)."""

import json
import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

from proxytune.remote.client import CompletionsClient, RemoteError, RemoteUnreachable, parse_token_key  # noqa: E402

URL = "http://fake.test:8000"
KEY = "sk-secret-0123456789"


def _completion(tokens, k=2):
    """A vLLM-shaped completion answer: each token's log-prob -0.5, the top-k ``token_id:`` keys (k + 1 entries
    where the sampled token is outside the top k)."""
    tops = []
    for t in tokens:
        top = {f"token_id:{j}": -1.0 - j for j in range(k)}
        top[f"token_id:{t}"] = -0.5 if t < k else -3.0
        tops.append(top)
    lp = {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": [-0.5] * len(tokens),
          "top_logprobs": tops, "text_offset": list(range(len(tokens)))}  # fmt: skip
    return {"id": "cmpl-1", "object": "text_completion", "model": "base",
            "choices": [{"index": 0, "text": "", "logprobs": lp, "finish_reason": "length"}]}  # fmt: skip


class Fake:
    """A scripted server: ``script`` is a list of what to do with each completion request in turn (an int
    status with a JSON error, ``"drop"`` to raise a dropped connection, ``"ok"`` to answer); requests are logged."""

    def __init__(self, script=(), models=("base",)):
        self.script, self.models, self.seen = list(script), list(models), []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": m} for m in self.models]})
        if request.url.path == "/tokenize":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        what = self.script.pop(0) if self.script else "ok"
        if what == "drop":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if isinstance(what, int):
            return httpx.Response(what, json={"error": {"message": f"busy ({what})", "type": "x", "code": what}})
        if body.get("logprobs", 0) > 20:
            msg = f"Requested sample logprobs of {body['logprobs']}, which is greater than max allowed: 20"
            return httpx.Response(400, json={"error": {"message": msg, "type": "BadRequestError", "param": "logprobs"}})
        n = body["max_tokens"]
        return httpx.Response(200, json=_completion([(body.get("seed") or 0) % 5 + i for i in range(n)]))

    def completions(self):
        return [r for r in self.seen if r.url.path == "/v1/completions"]


def client(fake, **kw):
    waits = []
    kw = {"max_retries": 3, "backoff": 0.25, **kw}
    c = CompletionsClient(URL, transport=httpx.MockTransport(fake), sleep=waits.append, **kw)
    return c, waits


def test_complete_parses_ids_and_removes_the_extra_sampled_token():
    c, _ = client(Fake(), model="base")
    r = c.complete([1, 2, 3], 3, logprobs=2, seed=1)
    assert r.tokens == [1, 2, 3] and r.logprobs == [-0.5] * 3 and r.finish_reason == "length"
    assert r.top[0] == {0: -1.0, 1: -0.5}  # sampled token 1 inside the top 2: kept
    assert r.top[2] == {0: -1.0, 1: -2.0}  # sampled token 3 listed beyond the top 2: not part of K
    assert c.requests == 1


def test_the_request_asks_for_ids_and_no_filters():
    fake = Fake()
    c, _ = client(fake, model="base")
    c.complete([5, 6], 2, logprobs=-1, temperature=1.0, seed=7, extra={"ignore_eos": True})
    body = json.loads(fake.completions()[0].content)
    assert body["prompt"] == [5, 6] and body["return_tokens_as_token_ids"] is True and body["logprobs"] == -1
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"], body["seed"]) == (1.0, 1.0, -1, 0.0, 7)
    assert body["ignore_eos"] is True and body["model"] == "base"


@pytest.mark.parametrize("failures", [[429], [503, 503], ["drop"], [500, "drop", 502]])
def test_retries_give_one_whole_answer(failures):
    fake = Fake(script=failures)
    c, waits = client(fake, model="base")
    r = c.complete([1], 4, logprobs=2, seed=3)
    assert r.tokens == [3, 4, 5, 6]  # one whole answer: nothing duplicated, nothing lost
    assert len(fake.completions()) == len(failures) + 1
    assert waits == [0.25 * 2**i for i in range(len(failures))]  # exponential backoff
    # the same request each time (a seeded request retried draws the same tokens)
    assert len({r.content for r in fake.completions()}) == 1


def test_retry_after_is_honoured_and_bounded():
    fake = Fake()
    slow = {"error": {"message": "slow down"}}
    calls = iter([httpx.Response(429, headers={"Retry-After": "2"}, json=slow),
                  httpx.Response(429, headers={"Retry-After": "3600"}, json=slow)])  # fmt: skip

    def handler(request):
        if request.url.path == "/v1/completions":
            nxt = next(calls, None)
            if nxt is not None:
                return nxt
        return fake(request)

    waits = []
    c = CompletionsClient(URL, model="base", transport=httpx.MockTransport(handler), sleep=waits.append)
    assert c.complete([1], 1, logprobs=2).tokens == [0]
    assert waits == [2.0, 30.0]


def test_retries_run_out_with_a_clear_error():
    fake = Fake(script=[503] * 10)
    c, waits = client(fake, model="base", max_retries=2)
    with pytest.raises(RemoteError) as e:
        c.complete([1], 2, logprobs=2)
    msg = str(e.value)
    assert msg == f"{URL}/v1/completions: a completion failed after 3 attempts: HTTP 503: the server says: busy (503)"
    assert e.value.status == 503 and not isinstance(e.value, RemoteUnreachable)
    assert len(fake.completions()) == 3 and len(waits) == 2


def test_dropped_connections_every_time_are_unreachable():
    c, _ = client(Fake(script=["drop"] * 5), model="base", max_retries=1)
    with pytest.raises(RemoteUnreachable, match=r"failed after 2 attempts: the connection failed \(RemoteProtocolError"):
        c.complete([1], 2, logprobs=2)


def test_a_400_names_the_server_message_and_is_not_retried():
    fake = Fake()
    c, waits = client(fake, model="base")
    with pytest.raises(RemoteError) as e:
        c.complete([1], 2, logprobs=50)
    assert "a completion was refused (HTTP 400); the server says: Requested sample logprobs of 50, which is greater " \
           "than max allowed: 20" in str(e.value)  # fmt: skip
    assert e.value.status == 400 and "max allowed: 20" in e.value.server_message
    assert len(fake.completions()) == 1 and waits == []


def test_models_and_check_model():
    c, _ = client(Fake(models=["base", "other"]), model="nope")
    with pytest.raises(RemoteError, match=r"does not serve the model 'nope'; it serves: base, other"):
        c.check_model()
    c, _ = client(Fake(models=["only"]))
    assert c.check_model() == "only" and c.model == "only"
    c, _ = client(Fake(models=["a", "b"]))
    with pytest.raises(RemoteError, match=r"serves 2 models \(a, b\): name one"):
        c.complete([1], 1)


def test_tokenize_absent_is_none():
    c, _ = client(Fake(), model="base")
    assert c.tokenize("hello") is None


def test_string_keys_are_refused():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        answer = _completion([1], k=2)
        answer["choices"][0]["logprobs"]["tokens"] = ["Ġthe"]
        return httpx.Response(200, json=answer)

    c = CompletionsClient(URL, transport=httpx.MockTransport(handler))
    with pytest.raises(RemoteError, match=r"returned the token 'Ġthe' as a string, not an id"):
        c.complete([1], 1)
    assert parse_token_key("token_id:16") == 16
    # a completion's bare "42" may be the text "42": only prompt_logprobs keys (ids) may be plain numbers
    assert parse_token_key("42", plain_ok=True) == 42 and parse_token_key(7, plain_ok=True) == 7
    for key, plain_ok in (("42", False), (7, False), ("\u00b2", True), ("token_id:x", False)):
        with pytest.raises(RemoteError, match="as a string, not an id"):
            parse_token_key(key, URL, plain_ok)


def test_vllm_floor_reads_as_minus_infinity():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        answer = _completion([0], k=2)
        answer["choices"][0]["logprobs"]["top_logprobs"][0]["token_id:1"] = -9999.0
        return httpx.Response(200, json=answer)

    r = CompletionsClient(URL, transport=httpx.MockTransport(handler)).complete([1], 1, logprobs=2)
    assert r.top[0][1] == float("-inf")


def test_the_api_key_is_sent_but_never_shown(monkeypatch):
    monkeypatch.setenv("PROXYTUNE_API_KEY", KEY)
    fake = Fake(script=[503] * 5, models=["base"])
    c, _ = client(fake, model="nope", max_retries=1)
    assert KEY not in repr(c) and "api_key=<set>" in repr(c)
    assert fake.seen == []
    with pytest.raises(RemoteError) as e:
        c.check_model()
    assert KEY not in str(e.value)
    assert fake.seen[0].headers["authorization"] == f"Bearer {KEY}"
    c.model = "base"
    with pytest.raises(RemoteError) as e:
        c.complete([1], 1)
    assert KEY not in str(e.value) and KEY not in repr(e.value)
    monkeypatch.delenv("PROXYTUNE_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "other-key")
    fake2 = Fake()
    c2, _ = client(fake2, model="base")
    c2.models()
    assert fake2.seen[0].headers["authorization"] == "Bearer other-key"


def test_concurrent_rows_keep_their_order():
    fake = Fake()
    c, _ = client(fake, model="base", max_concurrency=4)
    out = c.complete_many([dict(prompt_ids=[1], max_tokens=2, logprobs=2, seed=s) for s in range(10)])
    assert [r.tokens for r in out] == [[s % 5, s % 5 + 1] for s in range(10)]
    assert len(fake.completions()) == 10


def test_score_reads_prompt_logprobs():
    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        body = json.loads(request.content)
        assert body["prompt"] == [1, 2, 3, 4] and body["prompt_logprobs"] == 1
        plp = [None, {"2": {"logprob": -0.1, "rank": 1}},
               {"0": {"logprob": -0.2, "rank": 1}, "3": {"logprob": -2.0, "rank": 4}},
               {"4": {"logprob": -0.3, "rank": 1}}]  # fmt: skip
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "", "prompt_logprobs": plp,
                                                      "finish_reason": "length"}]})  # fmt: skip

    c = CompletionsClient(URL, transport=httpx.MockTransport(handler))
    s = c.score([1, 2], [3, 4], logprobs=1)
    assert s.logprobs == [-2.0, -0.3]
    assert s.top == [{0: -0.2}, {4: -0.3}]  # the given token 3 beyond the top 1 is not part of K


def test_bad_arguments():
    with pytest.raises(ValueError, match="url must be an http:// or https:// address"):
        CompletionsClient("127.0.0.1:8000")
    with pytest.raises(ValueError, match="max_retries"):
        CompletionsClient(URL, max_retries=-1)
    c, _ = client(Fake(), model="base")
    with pytest.raises(ValueError, match="prompt_ids"):
        c.complete([], 1)
    assert CompletionsClient(URL + "/v1/").url == URL


def test_a_dead_url_fails_fast_with_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    c = CompletionsClient(f"http://127.0.0.1:{port}", model="base", max_retries=2, backoff=0.2)
    t0 = time.monotonic()
    with pytest.raises(RemoteUnreachable) as e:
        c.complete([1], 1)
    assert time.monotonic() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"http://127.0.0.1:{port}/v1/completions: a completion failed after 3 attempts: cannot connect")
    assert isinstance(e.value, ConnectionError)


class _Tok:
    """A stand-in tokenizer: ``tok(text).input_ids``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, text):
        return type("Enc", (), {"input_ids": self.fn(text)})()


def test_check_same_tokenizer():
    from proxytune.remote.client import check_same_tokenizer

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        text = json.loads(request.content)["prompt"]
        return httpx.Response(200, json={"tokens": [1] + [ord(ch) % 300 for ch in text], "count": 0})

    c = CompletionsClient(URL, transport=httpx.MockTransport(handler))
    assert check_same_tokenizer(c, _Tok(lambda s: [1] + [ord(ch) % 300 for ch in s])) is True
    with pytest.raises(RemoteError, match=r"tokenizes 'Hello.* as \[1, 72, .*but the local models' tokenizer as \[1, 73"):
        check_same_tokenizer(c, _Tok(lambda s: [1] + [(ord(ch) + 1) % 300 for ch in s]))
    with pytest.warns(UserWarning, match="no /tokenize endpoint"):
        assert check_same_tokenizer(client(Fake(), model="base")[0], _Tok(lambda s: [1])) is False


def test_no_top_k_still_gives_ids():
    fake = Fake()
    c, _ = client(fake, model="base")
    r = c.complete([1], 2, logprobs=None, seed=2)
    assert json.loads(fake.completions()[0].content)["logprobs"] == 0
    assert r.tokens == [2, 3] and r.logprobs == [-0.5, -0.5] and r.top == [{}, {}]


def _answering(body_of):
    """A client of a server that lists ``base`` and answers every other request with ``body_of(request)`` (a
    JSON-able object, or an ``httpx.Response``)."""

    def handler(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "base"}]})
        out = body_of(request)
        if isinstance(out, httpx.Response):
            return out  # json.dumps writes NaN / Infinity, as a careless server would
        return httpx.Response(200, content=json.dumps(out).encode(), headers={"content-type": "application/json"})

    return CompletionsClient(URL, "base", transport=httpx.MockTransport(handler), max_retries=1, sleep=lambda s: None)


def _edited(edit):
    """A valid completion of token 1 (top 2), then ``edit(answer)``."""

    def body(request):
        answer = _completion([1], k=2)
        edit(answer)
        return answer

    return body


def _set(path, value):
    def edit(answer):
        at = answer
        for key in path[:-1]:
            at = at[key]
        at[path[-1]] = value

    return edit


LP = ("choices", 0, "logprobs")


@pytest.mark.parametrize("body, message", [
    (_edited(_set(("choices",), [None])), "unexpected answer"),
    (_edited(_set((*LP, "top_logprobs"), [[-1.0]])), "unexpected answer"),
    (_edited(_set((*LP, "top_logprobs"), None)), "asked for the top 2 log-probs of each token, the server returned none"),
    (_edited(_set((*LP, "tokens"), ["7"])), "returned the token '7' as a string, not an id"),
    (_edited(_set((*LP, "token_logprobs"), [float("nan")])), "a log-prob must be <= 0, got nan"),
    (_edited(_set((*LP, "token_logprobs"), [0.5])), "a log-prob must be <= 0, got 0.5"),
    (_edited(_set((*LP, "top_logprobs"), [{"token_id:0": -1.0, "token_id:1": float("inf")}])), "must be <= 0, got inf"),
    (_edited(_set((*LP, "top_logprobs"), [{"token_id:1": -1.0, "token_id:01": -2.0, "token_id:9": -5}])),
     "the token id 1 is listed twice"),
    (lambda r: {"error": {"message": "engine overloaded"}}, "the server answered with an error: engine overloaded"),
    (lambda r: httpx.Response(200, content=b"notgzip", headers={"content-encoding": "gzip"}),
     "the answer could not be decoded"),
])  # fmt: skip
def test_a_malformed_completion_is_a_remote_error_naming_the_url(body, message):
    c = _answering(body)
    with pytest.raises(RemoteError, match=message) as e:
        c.complete([1], 1, logprobs=2)
    assert URL in str(e.value) and type(e.value) is RemoteError  # an answer came: not "unreachable"


def test_near_zero_log_probs_are_rounding():
    c = _answering(_edited(_set((*LP, "token_logprobs"), [1e-7])))
    assert c.complete([1], 1, logprobs=2).logprobs == [0.0]


def _prompt_answer(entry):
    """An answer scoring [1, 2, 3] with prompt_logprobs, position 2's entry replaced by ``entry``."""

    def body(request):
        plp = [None, {"2": {"logprob": -0.1}}, entry]
        answer = _completion([5], k=1)
        answer["choices"][0]["prompt_logprobs"] = plp
        return answer

    return body


@pytest.mark.parametrize("entry, message", [
    ({"3": {"lp": -1.0}}, "unexpected prompt_logprobs at position 2"),
    (None, "unexpected prompt_logprobs at position 2"),
    ([{"logprob": -1.0}], "unexpected prompt_logprobs at position 2"),
    ({"\u00b2": {"logprob": -1.0}}, "as a string, not an id"),
])  # fmt: skip
def test_malformed_prompt_logprobs_are_a_remote_error(entry, message):
    c = _answering(_prompt_answer(entry))
    with pytest.raises(RemoteError, match=message):
        c.score([1], [2, 3], logprobs=1)
    with pytest.raises(RemoteError, match=message):
        c.next_tops([1, 2, 3], 2, logprobs=1)


def test_next_tops_without_a_token_is_a_remote_error():
    c = _answering(_edited(_set((*LP,), None)))
    with pytest.raises(RemoteError, match="asked for one token, the server returned none"):
        c.next_tops([1, 2], 1, logprobs=2)


def test_tokenize_answers_of_another_shape():
    """A /tokenize of another shape is a RemoteError with the server's words; 405 or 422 (TGI's /tokenize
    takes another body) mean no vLLM-style endpoint: no check (None)."""
    c = _answering(lambda r: {"error": "tokenizer busy"})
    with pytest.raises(RemoteError, match="the server answered with an error: tokenizer busy"):
        c.tokenize("hello")
    c = _answering(lambda r: [[1, 2]])
    with pytest.raises(RemoteError, match="unexpected answer"):
        c.tokenize("hello")
    for status in (405, 422):
        assert _answering(lambda r: httpx.Response(status, json={"detail": "no"})).tokenize("hello") is None


def test_an_api_key_from_a_file_is_trimmed_and_a_broken_one_is_refused_unshown(monkeypatch):
    monkeypatch.setenv("PROXYTUNE_API_KEY", KEY + "\n")
    fake = Fake()
    c, _ = client(fake, model="base")
    c.models()
    assert fake.seen[0].headers["authorization"] == f"Bearer {KEY}"
    for bad, source in ((KEY[:5] + "\n" + KEY[5:], "PROXYTUNE_API_KEY"), (KEY + "é", "PROXYTUNE_API_KEY")):
        monkeypatch.setenv("PROXYTUNE_API_KEY", bad)
        with pytest.raises(ValueError, match=f"{source}: an API key must be printable ASCII") as e:
            CompletionsClient(URL)
        assert KEY[:5] not in str(e.value)
    with pytest.raises(ValueError, match="api_key: an API key must be printable ASCII"):
        CompletionsClient(URL, api_key="a b")


def test_the_server_message_kept_on_the_error_is_scrubbed_too():
    def body(request):
        return httpx.Response(401, json={"error": {"message": f"bad key Bearer {KEY}"}})

    c = CompletionsClient(URL, "base", api_key=KEY, transport=httpx.MockTransport(
        lambda r: httpx.Response(200, json={"data": [{"id": "base"}]}) if r.url.path == "/v1/models" else body(r)))
    with pytest.raises(RemoteError) as e:
        c.complete([1], 1)
    assert KEY not in str(e.value) and KEY not in (e.value.server_message or "") and "<api key>" in e.value.server_message

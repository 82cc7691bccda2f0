"""A served base as an ensemble member (``proxytune.engine.remote_base``, ``base_draft_decoder``) against an
in-process fake of vLLM's completions server backed by a tiny local model (tests/fake_completions.py): the
whole vocabulary equals local proxy-tuning; top-k ``drop`` equals an independent loop; blocks equal one
request per token for greedy rows in fewer requests and are exact in distribution for sampled rows; scoring;
speculative decoding with the served base verifying; bad input. The real vLLM server: tests/test_remote_server.py."""

import json
import math
import socket
import time

import pytest
import torch

httpx = pytest.importorskip("httpx")

from fake_completions import FakeCompletions  # noqa: E402
from oracle import chi2_pvalue  # noqa: E402
from proxytune import Ensemble, ProxyTuner, SamplingParams  # noqa: E402
from proxytune.engine.members import LocalModel  # noqa: E402
from proxytune.engine.remote_base import RemoteModel  # noqa: E402
from proxytune.remote.client import RemoteError, RemoteUnreachable  # noqa: E402
from proxytune.remote.rows import dense_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
URL = "http://served.test:8000"
PROMPTS = ["the cat sat on", "a dog and a", "one two three four five"]


@pytest.fixture(scope="module")
def llama(trios):
    return trios["llama"]


def _ensemble(llama, tok, weight=1.0, **remote):
    base, expert, anti = llama
    fake = FakeCompletions(base, tok, max_logprobs=-1)
    member = RemoteModel(URL, logprobs=remote.pop("logprobs", 20), transport=fake.transport(), **remote)
    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    return Ensemble(member, [e], [a], weights=[weight], tokenizer=tok), fake


def _local(llama, tok, weight=1.0):
    return ProxyTuner(Ensemble.of_modules(*llama[:1], [llama[1]], [llama[2]], weights=[weight], tokenizer=tok))


def ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("block", [1, 3, "adaptive"])
def test_the_whole_vocabulary_equals_local_proxy_tuning(llama, tok, block):
    ens, fake = _ensemble(llama, tok, weight=0.8, logprobs="all", block=block)
    remote = ProxyTuner(ens).generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    local = _local(llama, tok, 0.8).generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    assert ids(remote) == ids(local)
    assert all(g.finish_reason == "length" and len(g.token_ids) == 12 for g in remote)


def _independent_drop_loop(llama, tok, prompt, n, k, weight):
    """One token per step: the base's top-k log-probs as a drop row plus weight * (expert - anti), argmax."""
    base, expert, anti = llama
    seq = tok(prompt).input_ids
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq])
            lp = torch.log_softmax(base(x).logits[0, -1].float(), -1)
            top = dict(zip(lp.topk(k).indices.tolist(), lp.topk(k).values.tolist()))
            row = dense_rows([top], lp.shape[0], "drop")[0]
            s = row + weight * (expert(x).logits[0, -1] - anti(x).logits[0, -1])
            t = int(s.argmax())
            out.append(t)
            seq.append(t)
    return out


def test_top_k_drop_equals_an_independent_loop_and_blocks_need_fewer_requests(llama, tok):
    k, n, w = 5, 16, 1.5
    want = [_independent_drop_loop(llama, tok, p, n, k, w) for p in PROMPTS]
    single, fake1 = _ensemble(llama, tok, weight=w, logprobs=k, block=1)
    blocks, fake4 = _ensemble(llama, tok, weight=w, logprobs=k, block=4)
    assert ids(ProxyTuner(single).generate(PROMPTS, max_new_tokens=n, temperature=0.0)) == want
    assert ids(ProxyTuner(blocks).generate(PROMPTS, max_new_tokens=n, temperature=0.0)) == want
    assert fake1.log[0]["prompt"] == [0]  # the probe when it joined (the logprobs cap), then
    assert len(fake1.log) - 1 == len(PROMPTS) * n  # one request per token (the first from the prefill)
    assert len(fake4.log) < len(fake1.log)
    assert all(body["logprobs"] == k and body.get("ignore_eos") for body in fake4.log)
    assert max(body["max_tokens"] for body in fake4.log) == 4


def test_floor_gives_tokens_the_base_ranks_low_a_chance(llama, tok):
    """Under floor an expert can promote a token outside the top k; under drop it cannot."""
    big = 40.0
    drop, _ = _ensemble(llama, tok, weight=big, logprobs=2, tail="drop")
    floor, _ = _ensemble(llama, tok, weight=big, logprobs=2, tail="floor")
    assert floor.base.block == 1
    base, expert, anti = llama
    x = tok(PROMPTS[0], return_tensors="pt").input_ids
    with torch.no_grad():
        top2 = set(base(x).logits[0, -1].topk(2).indices.tolist())
        shift = int((expert(x).logits[0, -1] - anti(x).logits[0, -1]).argmax())
    first_drop = ProxyTuner(drop).generate(PROMPTS[0], max_new_tokens=1, temperature=0.0).token_ids[0]
    first_floor = ProxyTuner(floor).generate(PROMPTS[0], max_new_tokens=1, temperature=0.0).token_ids[0]
    assert first_drop in top2
    if shift not in top2:
        assert first_floor not in top2


def test_a_seeded_run_repeats_and_stays_in_the_vocabulary(llama, tok):
    ens, fake = _ensemble(llama, tok, logprobs=20, block="adaptive")
    tuner = ProxyTuner(ens)
    a = tuner.generate(PROMPTS, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7, return_logprobs=True)
    b = tuner.generate(PROMPTS, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7, return_logprobs=True)
    assert ids(a) == ids(b) and [g.logprobs for g in a] == [g.logprobs for g in b]
    assert all(0 <= t < ens.vocab_size for g in a for t in g.token_ids)
    assert all(math.isfinite(x) and x <= 0 for g in a for x in g.logprobs)
    c = tuner.generate(PROMPTS, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=8)
    assert ids(c) != ids(a)
    seeds = {body.get("seed") for body in fake.log if body["temperature"] == 1.0}
    assert len(seeds) > len(PROMPTS)  # a fresh server seed per draft request


N_ROWS = 600


def _joint_target(llama, tok, prompt, weight, k):
    """The exact joint law of the first two tokens under the top-k drop target: ``{(a, b): p}``."""
    base, expert, anti = llama
    seq = tok(prompt).input_ids

    def p_next(prefix):
        x = torch.tensor(prefix)
        with torch.no_grad():
            lp = torch.log_softmax(base(x).logits[:, -1].double(), -1)
            s = lp + weight * (expert(x).logits[:, -1].double() - anti(x).logits[:, -1].double())
        keep = torch.zeros_like(lp, dtype=torch.bool).scatter(1, lp.topk(k, dim=1).indices, True)
        return torch.softmax(torch.where(keep, s, float("-inf")), -1)

    p1 = p_next([seq])[0]
    firsts = p1.nonzero()[:, 0].tolist()
    p2 = p_next([seq + [a] for a in firsts])
    return {(a, b): float(p1[a] * p2[i, b]) for i, a in enumerate(firsts) for b in p2[i].nonzero()[:, 0].tolist()}


def test_sampled_blocks_are_exact_in_distribution(llama, tok):
    """N_ROWS seeded rows of one prompt draw two tokens with base-drafted blocks (block 2: the second token
    comes from a server draft verified by the local pair); their joint law is the top-k drop target's
    (chi-square), and the base's own law is rejected (the control that must fail)."""
    k, w = 3, 1.0
    ens, _ = _ensemble(llama, tok, weight=w, logprobs=k, block=2)
    params = [SamplingParams(max_new_tokens=2, temperature=1.0, seed=s) for s in range(N_ROWS)]
    gens = ProxyTuner(ens).generate([PROMPTS[0]] * N_ROWS, params)
    counts = {}
    for g in gens:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
    assert chi2_pvalue(counts, _joint_target(llama, tok, PROMPTS[0], w, k), N_ROWS) > 1e-3
    assert chi2_pvalue(counts, _joint_target(llama, tok, PROMPTS[0], 0.0, k), N_ROWS) < 1e-6  # the control


def test_speculative_decoding_with_a_served_verifier(llama, tok):
    """The expert drafts, the served base verifies a whole block in one request (prompt_logprobs)."""
    ens, fake = _ensemble(llama, tok, weight=0.8, logprobs="all", block=1)
    got = ProxyTuner(ens, speculative_tokens=3).generate(PROMPTS, max_new_tokens=12, temperature=0.0)
    assert ids(got) == ids(_local(llama, tok, 0.8).generate(PROMPTS, max_new_tokens=12, temperature=0.0))
    assert any("prompt_logprobs" in body for body in fake.log)


def test_score_equals_local_with_the_whole_vocabulary(llama, tok):
    ens, _ = _ensemble(llama, tok, weight=0.8, logprobs="all")
    conts = [" mat", " cat and", " six"]
    remote = ProxyTuner(ens).score(PROMPTS, conts)
    local = _local(llama, tok, 0.8).score(PROMPTS, conts)
    for r, l in zip(remote, local):
        assert r.token_ids == l.token_ids
        assert r.logprob == pytest.approx(l.logprob, abs=1e-3)
        assert r.is_greedy == l.is_greedy
        assert r.token_logprobs == pytest.approx(l.token_logprobs, abs=1e-4)


def test_static_decoding_is_refused_and_auto_is_eager(llama, tok):
    ens, _ = _ensemble(llama, tok)
    assert ProxyTuner(ens).decode == "eager"
    with pytest.raises(ValueError, match="base is not a local model"):
        ProxyTuner(ens, decode="static")


def test_bad_arguments_are_named(llama, tok):
    for kw, msg in [(dict(logprobs=0), "logprobs must be"), (dict(logprobs="some"), "logprobs must be"),
                    (dict(tail="high"), "tail must be"), (dict(block=0), "block must be"),
                    (dict(tail="floor", block=4), "block=4 with tail=floor")]:  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            RemoteModel(URL, **kw)
    for url in ("served.test:8000", "ftp://served.test", "http://", "http://served.test:port"):
        with pytest.raises(ValueError, match="url must be an http:// or https:// address with a host"):
            RemoteModel(url)


def test_the_servers_refusals_are_named(llama, tok):
    base, expert, anti = llama
    fake = FakeCompletions(base, tok, max_logprobs=20)
    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    with pytest.raises(RemoteError, match="does not serve the model 'other'; it serves: base"):
        Ensemble(RemoteModel(URL, "other", transport=fake.transport()), [e], [a], tokenizer=tok)
    with pytest.raises(RemoteError, match="logprobs=50 .*greater than max allowed: 20"):  # when it joins
        Ensemble(RemoteModel(URL, logprobs=50, transport=fake.transport()), [e], [a], tokenizer=tok)


def test_another_tokenizer_is_refused_before_generating(llama, tok):
    from tiny_models import tiny_tokenizer

    base, expert, anti = llama
    other = tiny_tokenizer(vocab_size=300, corpus=["zebra quartz " * 20, "xylophone jam " * 20])
    fake = FakeCompletions(base, other)
    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    with pytest.raises(RemoteError, match="needs the same tokenizer"):
        Ensemble(RemoteModel(URL, transport=fake.transport()), [e], [a], tokenizer=tok)
    assert [b["prompt"] for b in fake.log] == [[0]]  # refused before generating (after the logprobs probe)


def test_a_dead_url_is_one_clear_error_within_seconds(llama, tok):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    e, a = LocalModel.adopt(llama[1], "expert 0"), LocalModel.adopt(llama[2], "anti-expert 0")
    t0 = time.monotonic()
    with pytest.raises(RemoteUnreachable, match=f"127.0.0.1:{port}.*cannot connect"):
        Ensemble(RemoteModel(f"http://127.0.0.1:{port}", max_retries=1, timeout=5), [e], [a], tokenizer=tok)
    assert time.monotonic() - t0 < 10


def test_the_position_limit_leaves_the_servers_one_generated_position(llama, tok):
    """Every request asks for at least one position past what it sends, so the served base takes
    max_model_len - 1 fed positions: scoring to exactly max_model_len tokens works, one more is refused up
    front (not the server's 400); generation stops at the limit without a refused request."""
    base, expert, anti = llama
    fake = FakeCompletions(base, tok, max_logprobs=-1, max_model_len=12)
    member = RemoteModel(URL, logprobs="all", transport=fake.transport())
    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    tuner = ProxyTuner(Ensemble(member, [e], [a], tokenizer=tok, eos_token_ids=[]))  # no EOS: runs to the limit
    assert member.position_limit == 11
    prompt = tok("one two three four").input_ids[:5]  # ids: scored as given
    cont = list(range(5, 5 + 12 - len(prompt)))
    assert len(tuner.score([prompt], [cont])[0].token_logprobs) == len(cont)  # 11 sent, the 12th from the generated position
    with pytest.raises(ValueError, match="base takes at most 11"):
        tuner.score([prompt], [cont + [5]])
    got = tuner.generate(prompt, max_new_tokens=64, temperature=0.0)
    assert len(prompt) + len(got.token_ids) == 11 and got.finish_reason == "length"


def test_every_draw_is_asked_without_penalties(llama, tok):
    """A server fills the fields a request leaves out from the model's generation_config (vLLM's default), and a
    penalised draw is not the law of the raw log-probs the blocks are verified with: every request says so."""
    ens, fake = _ensemble(llama, tok, logprobs=20, block=4)
    ProxyTuner(ens).generate(PROMPTS[:2], max_new_tokens=6, temperature=1.0, seed=3)
    assert fake.log and all(b["repetition_penalty"] == 1.0 and b["presence_penalty"] == 0.0
                            and b["frequency_penalty"] == 0.0 for b in fake.log)  # fmt: skip


def test_a_server_that_breaks_the_protocol_is_a_remote_error(llama, tok):
    """A completion with no tokens (a block must give at least one) or too few prompt positions: a RemoteError
    naming the URL (the command line prints it as one line), not a crash."""
    import httpx

    base, expert, anti = llama
    fake = FakeCompletions(base, tok, max_logprobs=-1)

    def empty(request: httpx.Request) -> httpx.Response:
        r = fake(request)
        if request.url.path != "/v1/completions":
            return r
        data = r.json()
        lp = data["choices"][0]["logprobs"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            lp[key] = []
        data["choices"][0].pop("prompt_logprobs", None)
        return httpx.Response(200, json=data)

    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    for block in (4, 1):
        member = RemoteModel(URL, logprobs="all", block=block, transport=httpx.MockTransport(empty))
        with pytest.raises(RemoteError, match="served.test:8000"):
            ProxyTuner(Ensemble(member, [e], [a], tokenizer=tok)).generate(PROMPTS[0], max_new_tokens=4, seed=1)


def _rewriting(fake, rewrite):
    """A transport in front of ``fake`` whose completion answers pass through ``rewrite(body, choice)``."""
    import httpx

    def handler(request: httpx.Request) -> httpx.Response:
        r = fake(request)
        if request.url.path != "/v1/completions" or r.status_code != 200:
            return r
        data = r.json()
        rewrite(json.loads(request.content), data["choices"][0])
        return httpx.Response(200, json=data)

    return httpx.MockTransport(handler)


def test_a_draft_outside_the_local_vocabulary_ends_its_block_and_is_rejected(llama, tok):
    """A server drafting an id the local models do not have (a wider served vocabulary): the block ends there
    (the local models are never fed it), the draft is rejected (target probability 0) and the target's own
    token drawn: greedy ids equal local proxy-tuning, sampled ids stay in the vocabulary."""
    base, expert, anti = llama
    v = len(tok)

    def widen(body, choice):
        lp = choice["logprobs"]
        if body["max_tokens"] > 1 and len(lp["tokens"]) > 1:
            lp["tokens"][1] = f"token_id:{v + 3}"
            lp["token_logprobs"][1] = -0.01
            lp["top_logprobs"][1][f"token_id:{v + 3}"] = -0.01

    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    fake = FakeCompletions(base, tok, max_logprobs=-1)
    member = RemoteModel(URL, logprobs="all", block=4, transport=_rewriting(fake, widen))
    tuner = ProxyTuner(Ensemble(member, [e], [a], weights=[0.8], tokenizer=tok))
    got = tuner.generate(PROMPTS, max_new_tokens=10, temperature=0.0)
    assert ids(got) == ids(_local(llama, tok, 0.8).generate(PROMPTS, max_new_tokens=10, temperature=0.0))
    sampled = tuner.generate(PROMPTS, max_new_tokens=10, temperature=1.0, seed=5)
    assert all(0 <= t < v for g in sampled for t in g.token_ids)


def test_a_position_with_no_token_in_the_local_vocabulary_is_a_remote_error(llama, tok):
    base, expert, anti = llama
    v = len(tok)

    def outside(body, choice):
        lp = choice["logprobs"]
        lp["top_logprobs"] = [{f"token_id:{v + 1}": -0.1, f"token_id:{v + 2}": -0.2} for _ in lp["tokens"]]

    e, a = LocalModel.adopt(expert, "expert 0"), LocalModel.adopt(anti, "anti-expert 0")
    member = RemoteModel(URL, logprobs=2, block=1, transport=_rewriting(FakeCompletions(base, tok), outside))
    with pytest.raises(RemoteError, match=f"returned no token below {v} .* in the top 2 of a position"):
        ProxyTuner(Ensemble(member, [e], [a], tokenizer=tok)).generate(PROMPTS[0], max_new_tokens=3)

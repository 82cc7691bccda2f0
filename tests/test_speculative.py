"""Speculative decoding (``speculative_tokens=k``) against the plain engine: greedy ids, row ends, rollback,
log-probabilities, batch independence, the math helpers and the option's errors.

Random tiny trios (``tests/tiny_models.py``) reject most drafts; a tuner whose expert *is* the base (weight
0: the target is the base, the draft is the base) accepts every draft, so whole blocks are accepted and the
row ends (EOS, stop strings, budgets) fall inside them. The distribution test is
``tests/test_speculative_distribution.py``.
"""

import pytest
import torch

from proxytune import ProxyTuner, SamplingParams
from proxytune.engine.runner import ModelRunner
from proxytune.engine.loading import ModelSpec, load_model
from proxytune.engine.prompts import left_pad
from proxytune.noise import philox4x32_10, stream_seed, uniform
from proxytune.reference import keep_mask_reference, sample_reference
from proxytune.speculative import ACCEPT_STREAM, accept_drafts, accept_greedy, accepted_counts, filtered_logprobs, \
    residual_logits  # fmt: skip
from tiny_models import EOS_ID, KINDS, PROMPTS, tiny_trio

WEIGHTS = [0.0, 0.5, 1.0, 0.5]  # per row of PROMPTS
BUDGETS = [3, 10, 7, 12]  # per row: mixed lengths and budgets


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_trio(kind) for kind in KINDS}


class Calls:
    """Counts a module's forward calls."""

    def __init__(self, module):
        self.n = 0
        self.handle = module.register_forward_pre_hook(lambda *a: setattr(self, "n", self.n + 1))

    def remove(self):
        self.handle.remove()


def ids(gens):
    return [g.token_ids for g in gens]


GREEDY_CASES = [pytest.param(kind, ks, id=f"{kind}-k{ks[0]}-k{ks[1]}")
                for kind, ks in (("llama", (1, 8)), ("qwen2", (2, 4)), ("gpt2", (4, 8)))]  # every k and kind
GREEDY_SLOW = [pytest.param(kind, (1, 2, 4, 8), marks=pytest.mark.slow, id=f"{kind}-all-k") for kind in KINDS]


@pytest.mark.parametrize("kind, ks", GREEDY_CASES + GREEDY_SLOW)
def test_greedy_ids_equal_the_plain_engine(kind, ks, models, tok):
    base, expert, anti = models[kind]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    params = [SamplingParams(temperature=0, max_new_tokens=n, weights=w) for n, w in zip(BUDGETS, WEIGHTS)]
    plain = tuner.generate(PROMPTS, params)
    assert all(len(g.token_ids) <= n for g, n in zip(plain, BUDGETS)) and max(len(g.token_ids) for g in plain) >= 7
    for k in ks:
        spec = tuner.generate(PROMPTS, params, speculative_tokens=k)
        assert ids(spec) == ids(plain), k
        assert [g.finish_reason for g in spec] == [g.finish_reason for g in plain]


def test_accepted_blocks_end_rows_where_the_plain_engine_does(models, tok):
    base, _, anti = models["llama"]
    tuner = ProxyTuner(base, base, anti, tokenizer=tok, weights=0.0, eos_token_ids=[EOS_ID])  # drafts all accepted
    reference = tuner.generate(PROMPTS, temperature=0, max_new_tokens=16)
    text = lambda n: tok.decode(reference[3].token_ids[:n], skip_special_tokens=True)  # noqa: E731
    n = next(n for n in range(5, 16) if text(n)[-2:] not in text(n - 1) and "\ufffd" not in text(n)[-2:])
    stop = text(n)[-2:]  # completed by row 3's n-th token
    tuner.eos_token_ids = frozenset({EOS_ID, reference[2].token_ids[6]})  # an EOS mid-block in row 2
    params = [SamplingParams(temperature=0, max_new_tokens=3), SamplingParams(temperature=0, max_new_tokens=13),
              SamplingParams(temperature=0, max_new_tokens=16),
              SamplingParams(temperature=0, max_new_tokens=16, stop=["never appears", stop])]  # fmt: skip
    plain = tuner.generate(PROMPTS, params)
    assert plain[2].finish_reason == "eos" and plain[3].finish_reason == "stop" and plain[0].finish_reason == "length"
    for k, adaptive in ((4, True), (8, False), (3, False)):
        tuner.speculative_adaptive = adaptive
        calls = Calls(anti)
        try:
            spec = tuner.generate(PROMPTS, params, speculative_tokens=k)
        finally:
            calls.remove()
        assert [(g.token_ids, g.text, g.finish_reason) for g in spec] == [
            (g.token_ids, g.text, g.finish_reason) for g in plain]  # fmt: skip
        # the anti-expert verifies once per round (one forward of up to k + 1 tokens) after its prefill; every
        # draft accepted, the longest row takes ceil((n - 1) / (k + 1)) rounds after its first token
        longest = max(len(g.token_ids) for g in plain)
        assert calls.n == 1 + -(-(longest - 1) // (k + 1)), (k, calls.n)


def test_two_pairs_greedy_and_streaming(models, tok):
    base = models["gpt2"][0]
    (e1, a1), (e2, a2) = models["llama"][1:], models["qwen2"][1:]
    tuner = ProxyTuner(base, [e1, e2], [a1, a2], tokenizer=tok, weights=[1.0, 0.5])
    plain = tuner.generate(PROMPTS, temperature=0, max_new_tokens=8)
    assert ids(tuner.generate(PROMPTS, temperature=0, max_new_tokens=8, speculative_tokens=3)) == ids(plain)
    events = list(tuner.stream(PROMPTS, temperature=0, max_new_tokens=8, speculative_tokens=3))
    for i, g in enumerate(plain):
        row = [e for e in events if e.index == i]
        assert [e.token_id for e in row] == g.token_ids and "".join(e.text for e in row) == g.text
        assert row[-1].finish_reason == g.finish_reason and all(e.finish_reason is None for e in row[:-1])


def test_sampled_rows_do_not_depend_on_their_batch_and_logprobs_are_the_targets(models, tok):
    base, expert, anti = models["qwen2"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.5, speculative_tokens=4)
    params = [SamplingParams(temperature=1.0, max_new_tokens=n, seed=40 + i) for i, n in enumerate(BUDGETS)]
    batched = tuner.generate(PROMPTS, params, return_logprobs=True)
    alone = [tuner.generate(p, q, return_logprobs=True) for p, q in zip(PROMPTS, params)]
    assert ids(batched) == ids(alone) and [len(g.token_ids) for g in batched] == BUDGETS
    assert ids(batched) != ids(tuner.generate(PROMPTS, params, speculative_tokens=0))  # other noise, same law
    scores = tuner.score(PROMPTS, [g.token_ids for g in batched])  # the target at T=1, no filter
    for g, a, sc in zip(batched, alone, scores):
        torch.testing.assert_close(g.logprobs, sc.token_logprobs, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(g.logprobs, a.logprobs, atol=2e-4, rtol=2e-4)
    events = list(tuner.stream(PROMPTS, params, return_logprobs=True))
    for i, g in enumerate(batched):
        assert [e.token_id for e in events if e.index == i] == g.token_ids
        assert [e.logprob for e in events if e.index == i] == g.logprobs


@pytest.mark.parametrize("kind", KINDS)
def test_a_rollback_leaves_the_cache_as_if_the_tokens_were_never_seen(kind, models):
    model = load_model(ModelSpec(models[kind][0]), "base", dtype=None, device=None, trust_remote_code=False)
    cpu = torch.device("cpu")
    prompts = [[1, 40, 41, 42, 43], [1, 50, 51]]
    runner = ModelRunner(model)
    runner.prefill(*left_pad(prompts, 0, cpu))
    runner.extend(torch.tensor([[11, 12, 13, 14], [15, 16, 17, 18]]))
    runner.rollback(4, torch.tensor([2, 1]))  # keep 11 12 and 15: a hole in row 1, two columns cropped
    runner.extend(torch.tensor([[60], [61]]))
    runner.rollback(1, torch.tensor([0, 1]))  # forget 60 in row 0 only (a hole at the end of row 0)
    assert runner.mask.shape[1] == runner.cache.get_seq_length() == 8
    after = runner.extend(torch.tensor([[20, 21], [22, 23]]))
    fresh = ModelRunner(model)
    fresh.prefill(*left_pad([prompts[0] + [11, 12], prompts[1] + [15, 61]], 0, cpu))
    expected = fresh.extend(torch.tensor([[20, 21], [22, 23]]))
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)
    assert runner.next_pos.tolist() == fresh.next_pos.tolist() == [9, 7]


def test_filtered_logprobs_are_the_references_distribution():
    torch.manual_seed(0)
    b, v = 12, 37
    s = torch.randn(b, v) * 2
    s[0, 5] = float("-inf")
    s[1, :] = s[1, 3]  # ties everywhere
    temperature = torch.tensor([1.0, 0.7, 0.0, 1.3] * 3)
    top_k = torch.tensor([0, 0, 0, 5, 3, 0, 0, 1, 0, 8, 0, 0])
    top_p = torch.tensor([1.0, 0.9, 1.0, 1.0, 0.8, 0.5, 1.0, 1.0, 1.0, 0.95, 0.3, 1.0])
    min_p = torch.tensor([0.0] * 6 + [0.1, 0.0, 0.2, 0.0, 0.0, 0.05])
    logp = filtered_logprobs(s, temperature, top_k, top_p, min_p)
    _, keep = keep_mask_reference(s, temperature, top_k, top_p, min_p)
    sampled = temperature > 0
    assert torch.equal(torch.isfinite(logp[sampled]), keep[sampled])
    torch.testing.assert_close(logp[sampled].exp().sum(1), torch.ones(int(sampled.sum())))
    assert torch.equal(logp[~sampled].argmax(1), s[~sampled].argmax(1)) and (torch.isfinite(logp[~sampled]).sum(1) == 1).all()
    w = torch.zeros(0, b)
    for seed in range(40):  # the reference's own draw: Gumbel-max over the kept set is a draw from exp(logp)
        seeds, steps = torch.full((b,), seed), torch.full((b,), 3)
        tokens, ref_lp = sample_reference(s, [], [], w, temperature, top_k, top_p, min_p, seeds, steps, v)
        from proxytune.noise import gumbel

        noise = gumbel(seeds[:, None], steps[:, None], torch.arange(v)[None, :])
        ours = torch.where(sampled, (logp + noise).argmax(1), logp.argmax(1))
        assert torch.equal(ours, tokens)
        got = logp.gather(1, tokens[:, None])[:, 0]
        torch.testing.assert_close(got, ref_lp, atol=1e-5, rtol=1e-5)


def test_accept_rule_and_residual():
    seed, step = torch.tensor([3, 3, 9]), torch.tensor([0, 0, 5])
    logp = torch.log(torch.tensor([[0.5, 0.0, 0.2], [0.9, 0.9, 0.9], [0.1, 0.2, 0.3]]))
    logq = torch.log(torch.tensor([[0.5, 0.3, 0.4], [0.3, 0.3, 0.3], [0.2, 0.2, 0.6]]))
    acc = accept_drafts(logp, logq, stream_seed(seed, ACCEPT_STREAM), step)
    assert acc[0, 0] and not acc[0, 1] and acc[1].all()  # p >= q always passes; p = 0 never does
    u = uniform(stream_seed(seed, 2)[:, None], step[:, None] + torch.arange(3), torch.zeros(3, 3, dtype=torch.int64))
    assert torch.equal(acc, u.double() < (logp.exp() / logq.exp()).double().clamp(max=1.0))
    assert accepted_counts(acc).tolist()[:2] == [1, 3]
    point = torch.tensor([[0.0, float("-inf"), 0.0]])  # greedy: point masses
    assert accept_greedy(point, torch.zeros(1, 3)).tolist() == [[True, False, True]]
    assert torch.equal(accept_greedy(point, torch.zeros(1, 3)), accept_drafts(point, torch.zeros(1, 3), seed[:1], step[:1]))
    assert accepted_counts(acc, torch.tensor([0, 2, 3])).tolist()[:2] == [0, 2]
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    q = torch.tensor([[0.2, 0.5, 0.1, 0.2]])
    r = residual_logits(p.log(), q.log()).exp()
    torch.testing.assert_close(r / r.sum(), torch.tensor([[0.75, 0.0, 0.25, 0.0]]))
    assert torch.equal(residual_logits(p.log(), p.log()), p.log())  # nothing left: the target itself


def test_stream_seeds_are_a_documented_pure_function():
    seed = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345])
    assert torch.equal(stream_seed(seed, 0), seed)
    for stream in (1, 2, 3):
        got = stream_seed(seed, stream)
        for s, g in zip(seed.tolist(), got.tolist()):
            u = s % 2**64
            one = lambda x: torch.tensor([x])  # noqa: E731
            x0, x1, _, _ = philox4x32_10(one(stream), one(0x53504543), one(0), one(0), one(u % 2**32), one(u >> 32))
            word = int(x0) + (int(x1) << 32)
            assert g == (word - 2**64 if word >= 2**63 else word)
    derived = torch.stack([stream_seed(seed, c) for c in (0, 1, 2, 3)])
    assert len(set(derived.flatten().tolist())) == derived.numel()  # no stream reuses another's seed here


def test_the_option_is_checked(models, tok):
    base, expert, anti = models["llama"]
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="speculative_tokens must be an integer >= 0"):
            ProxyTuner(base, expert, anti, tokenizer=tok, speculative_tokens=bad)
    with pytest.raises(ValueError, match="needs an \\(expert, anti-expert\\) pair"):
        ProxyTuner(base, tokenizer=tok, speculative_tokens=2)
    with pytest.raises(ValueError, match="runs in the eager decoder"):
        ProxyTuner(base, expert, anti, tokenizer=tok, speculative_tokens=2, decode="static")
    with pytest.raises(ValueError, match="speculative_adaptive must be"):
        ProxyTuner(base, expert, anti, tokenizer=tok, speculative_tokens=2, speculative_adaptive=1)
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    with pytest.raises(ValueError, match="speculative_tokens must be"):
        tuner.generate("hi", speculative_tokens=-3)
    with pytest.raises(ValueError, match="needs an"):
        ProxyTuner(base, tokenizer=tok).generate("hi", speculative_tokens=1)


def test_a_static_tuner_refuses_speculation_per_call_too(models, tok):
    """The constructor's rule (speculation runs in the eager decoder) holds for a call's override: a static
    tuner asked to speculate refuses, in generate and in stream, rather than running eager speculation."""
    base, expert, anti = models["llama"]
    static = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static")
    with pytest.raises(ValueError, match="runs in the eager decoder; decode='static' cannot speculate"):
        static.generate("hi", speculative_tokens=4, max_new_tokens=3)
    with pytest.raises(ValueError, match="runs in the eager decoder"):
        next(iter(static.stream(["hi"], speculative_tokens=2, max_new_tokens=3)))
    assert static.generate("hi", speculative_tokens=0, max_new_tokens=3, temperature=0).finish_reason == "length"


def test_cli_flag(tmp_path, capsys):
    from proxytune.cli import main
    from tiny_models import save_tiny

    d = {n: save_tiny(tmp_path / n, "llama", seed=s) for n, s in (("base", 0), ("expert", 1), ("anti", 2))}
    common = ["generate", "--base", d["base"], "-q", "--prompt", PROMPTS[1], "--temperature", "0",
              "--max-new-tokens", "6", "--format", "jsonl", "--seed", "1"]  # fmt: skip
    pair = ["--expert", d["expert"], "--anti-expert", d["anti"]]
    assert main(common + pair) == 0
    plain = capsys.readouterr().out
    assert main(common + pair + ["--speculative-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    for extra, message in ((["--speculative-tokens", "2"], "needs --expert"),
                           (pair + ["--speculative-tokens", "2", "--decode", "static"], "runs in the eager decoder"),
                           (pair + ["--speculative-tokens", "-1"], "--speculative-tokens")):  # fmt: skip
        assert main(common + extra) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("proxytune: error: ") and err.count("\n") == 1 and message in err, err

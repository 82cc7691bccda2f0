"""Speculative decoding samples exactly the plain engine's distribution (chi-square over thousands of seeds).

Tiny models with a vocabulary of 6 ids; one prompt repeated in a batch of N rows with seeds 0..N-1 (a row's
tokens do not depend on its batch). The first three tokens' joint frequencies are compared with the exact
proxy-tuned distribution computed from full forwards (no cache) with the reference's combination and
filters; the second and third tokens go through drafts, accept/reject, residual and bonus draws. A control
checks that the test can fail: the same frequencies against the draft model's distribution are rejected.
"""

import itertools

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.reference import keep_mask_reference
from oracle import chi2_pvalue, combine64
from tiny_models import tiny_model

V = 6
PROMPT = [1, 5, 3, 4]
N = 2000


@pytest.fixture(scope="module")
def trio():
    return tuple(tiny_model("llama", vocab_size=V, seed=s, std=0.1) for s in (10, 11, 12))


def _probs(models, prefixes, *, weight, temperature, top_k, top_p, combined=True):
    """The filtered, renormalised next-token probabilities (fp64 ``[len(prefixes), V]``) after each prefix:
    of the proxy-tuned target (``combined``) or of the expert alone (the draft)."""
    ids = torch.tensor([PROMPT + list(p) for p in prefixes])
    with torch.no_grad():
        base, expert, anti = (m(input_ids=ids).logits[:, -1].double() for m in models)
    b = ids.shape[0]
    s = combine64([base, expert, anti], [weight], V) if combined else expert[:, :V]
    full = lambda x, dt=torch.float64: torch.full((b,), x, dtype=dt)  # noqa: E731
    z, keep = keep_mask_reference(s, full(temperature), full(top_k, torch.int64), full(top_p), full(0.0))
    return torch.softmax(torch.where(keep, z, float("-inf")), dim=1)


def _joint(models, *, weight, temperature, top_k, top_p, draft_after_first=False):
    """P(x1, x2, x3) as a dict; ``draft_after_first``: x2, x3 from the draft model instead (the control)."""
    kw = dict(weight=weight, temperature=temperature, top_k=top_k, top_p=top_p)
    p1 = _probs(models, [()], **kw)[0]
    later = dict(kw, combined=not draft_after_first)
    p2 = _probs(models, [(a,) for a in range(V)], **later)
    pairs = list(itertools.product(range(V), repeat=2))
    p3 = _probs(models, pairs, **later)
    return {(a, b, c): float(p1[a] * p2[a, b] * p3[i, c]) for i, (a, b) in enumerate(pairs) for c in range(V)}


CONFIGS = [  # (weight, temperature, top_k, top_p)
    (1.0, 1.0, 0, 1.0),  # no filter
    (0.5, 1.0, 0, 0.8),  # top-p: drafts outside the target's nucleus are forbidden
    (1.0, 1.2, 3, 1.0),  # top-k: the expert's top 3 are not the target's
]


def test_speculative_first_tokens_follow_the_exact_distribution(trio, tok):
    """All configurations in one batch (per-row weights and filters), ``N`` seeds each."""
    from proxytune import SamplingParams

    tuner = ProxyTuner(*trio, tokenizer=tok, eos_token_ids=[], speculative_tokens=2, speculative_adaptive=False)
    assert tuner.vocab_size == V
    params = [SamplingParams(max_new_tokens=4, seed=i, weights=w, temperature=t, top_k=k, top_p=p)
              for (w, t, k, p) in CONFIGS for i in range(N)]  # fmt: skip
    gens = tuner.generate([PROMPT] * len(params), params)
    assert all(len(g.token_ids) == 4 for g in gens)
    for c, (w, t, k, p) in enumerate(CONFIGS):
        kw = dict(weight=w, temperature=t, top_k=k, top_p=p)
        if k or p < 1:  # the draft proposes tokens the target forbids after some first token
            firsts = [(a,) for a in range(V)]
            assert (_probs(trio, firsts, **kw, combined=False) > 0).logical_and(_probs(trio, firsts, **kw) == 0).any()
        counts: dict = {}
        for g in gens[c * N : (c + 1) * N]:
            counts[tuple(g.token_ids[:3])] = counts.get(tuple(g.token_ids[:3]), 0) + 1
        assert chi2_pvalue(counts, _joint(trio, **kw), N) > 1e-3, CONFIGS[c]
        # the control: the same frequencies are far from what the drafts alone would give
        assert chi2_pvalue(counts, _joint(trio, **kw, draft_after_first=True), N) < 1e-6, CONFIGS[c]

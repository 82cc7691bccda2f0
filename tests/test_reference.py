"""The reference op against Hugging Face's warpers, exact cases, distributions and batch invariance."""

import numpy as np
import pytest
import scipy.stats
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import proxytune
from proxytune.reference import combine_reference, keep_mask_reference
from proxytune.testing import proxy_inputs

from conformance import FILTERS as ALL_FILTERS, U32, U64, as_tuple, mass_above, mass_tolerance, per_row

WIDTHS = [(1, 1), (7, 7), (1000, 1000), (32000, 32000), (152064, 151936)]  # (base width, expert width)
# (temperature, top_k, top_p, min_p): the entries of the one filter table (tests/conformance.py) compared with
# Hugging Face's warpers (sampled, each filter alone and together; the first is top-p alone)
FILTERS = [as_tuple(ALL_FILTERS[i]) for i in (21, 22, 13, 23, 24)]


def hf_keep(scores, temperature, top_k, top_p, min_p):
    """The keep-set of Hugging Face's warper chain (same order as proxytune's)."""
    chain = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        chain.append(TopPLogitsWarper(top_p))
    if min_p > 0:
        chain.append(MinPLogitsWarper(min_p))
    for warper in chain:
        scores = warper(None, scores)
    return torch.isfinite(scores)


def closed_under_ties(s, keep):
    """Every token at least as large as the smallest kept one: HF cuts a tie group by sort order; proxytune
    keeps the whole group, exactly when HF keeps any of it (its first member has the mass strictly above)."""
    smallest_kept = torch.where(keep, s, float("inf")).amin(dim=1, keepdim=True)
    return torch.isfinite(s) & (s >= smallest_kept)


def unexplained_keep_differences(keep, expected, s, t, k, p, u):
    """Tokens where ``keep`` and ``expected`` differ although the exact mass above them is farther from ``p``
    than the rounding of the computation (``mass_tolerance`` at ``u``, plus fp64's for the fp64 sides: HF's
    warpers and the mass computed here). Returns their ``[row, col]`` list and the masses there."""
    mass, z, n, mean_abs_z = mass_above(s, t, k)
    tol = mass_tolerance(n, z, mean_abs_z, u) + 2 * mass_tolerance(n, z, mean_abs_z, U64)
    near_p = (mass - p).abs() <= tol
    bad = ((keep != expected) & ~near_p).nonzero().tolist()
    return bad, [mass[r, c].item() for r, c in bad[:3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"{w[0]}x{w[1]}")
def test_keep_set_matches_huggingface_warpers(widths, dtype):
    base_width, expert_width = widths
    batch = 4 if base_width > 100_000 else 8
    base, experts, antis = proxy_inputs(batch, base_width, 1, dtype, seed=1, expert_width=expert_width)
    v = min(base_width, expert_width)
    weights = torch.full((1, batch), 0.8)
    s64 = combine_reference(base, experts, antis, weights, v, torch.float64)
    s32 = combine_reference(base, experts, antis, weights, v).double()  # the fp32 logits, exactly
    expected = [(closed_under_ties(s64, hf_keep(s64.clone(), *f)), closed_under_ties(s32, hf_keep(s32.clone(), *f)))
                for f in FILTERS]  # fmt: skip
    for (t, k, p, mp), (expected64, expected32) in zip(FILTERS, expected):
        params = per_row(batch, temperature=t, top_k=k, top_p=p, min_p=mp)
        # fp64 math on the fp64 logits: the same set as HF's fp64 warpers except where a mass lies within
        # fp64 rounding of p (different summation orders on both sides).
        keep64 = keep_mask_reference(s64, **params)[1]
        bad, masses = unexplained_keep_differences(keep64, expected64, s64, t, k, p, U64)
        assert not bad, [(t, k, p, mp), bad[:3], masses]
        # fp32 math on the fp32 logits: the same set except where a top-p mass rounds across p.
        keep32 = keep_mask_reference(s32.float(), **params)[1]
        bad, masses = unexplained_keep_differences(keep32, expected32, s32, t, k, p, U32)
        assert not bad, [(t, k, p, mp), bad[:3], masses]


@pytest.mark.parametrize("widths", [(1000, 1000), (152064, 151936)], ids=lambda w: f"{w[0]}x{w[1]}")
def test_keep_set_check_catches_a_wrong_cut(widths):
    """The rounding allowance above explains only near-p differences: a cut at another p still fails."""
    base, experts, antis = proxy_inputs(4, widths[0], 1, seed=1, expert_width=widths[1])
    s32 = combine_reference(base, experts, antis, torch.full((1, 4), 0.8), min(widths)).double()
    t, k, p, mp = FILTERS[0]  # top-p 0.9 alone: the loosest allowance (every token in the softmax)
    expected32 = closed_under_ties(s32, hf_keep(s32.clone(), t, k, p, mp))
    for wrong_p in (p - 0.03, p + 0.03):
        wrong = keep_mask_reference(s32.float(), **per_row(4, temperature=t, top_k=k, top_p=wrong_p, min_p=mp))[1]
        bad, _ = unexplained_keep_differences(wrong, expected32, s32, t, k, p, U32)
        assert len(bad) > 0, wrong_p
    # ... and so does one token dropped from inside the nucleus (the first maximum is never near p)
    right = keep_mask_reference(s32.float(), **per_row(4, temperature=t, top_k=k, top_p=p, min_p=mp))[1]
    right[0, s32[0].argmax()] = False
    assert unexplained_keep_differences(right, expected32, s32, t, k, p, U32)[0] == [[0, int(s32[0].argmax())]]


def test_greedy_is_the_first_argmax():
    base = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0], [-1.0, float("-inf"), -0.5, -0.5]])
    assert proxytune.sample(base, temperature=0.0).tolist() == [1, 0, 2]
    tokens, logprobs = proxytune.sample(base, temperature=0.0, return_logprobs=True)
    assert logprobs.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_k_1_tiny_top_p_and_greedy_agree_with_argmax(dtype):
    base, experts, antis = proxy_inputs(16, 5000, 2, dtype, seed=3)
    s = proxytune.combine(base, experts, antis, weights=[0.7, 0.4])
    argmax = s.argmax(dim=1)
    seeds = torch.arange(16)
    assert torch.equal(proxytune.sample(base, experts, antis, weights=[0.7, 0.4], temperature=0), argmax)
    assert torch.equal(proxytune.sample(base, experts, antis, weights=[0.7, 0.4], top_k=1, seed=seeds), argmax)
    assert torch.equal(proxytune.sample(base, experts, antis, weights=[0.7, 0.4], top_p=1e-6, seed=seeds), argmax)
    tokens, logprobs = proxytune.sample(base, experts, antis, weights=[0.7, 0.4], top_k=1, seed=1, return_logprobs=True)
    assert torch.equal(logprobs, torch.zeros(16))


def test_weight_zero_gives_the_base_model():
    base, experts, antis = proxy_inputs(8, 3000, 1, torch.bfloat16, seed=4)
    assert torch.equal(proxytune.combine(base, experts, antis, weights=0.0), base.float())
    kwargs = dict(temperature=0.9, top_p=0.95, seed=torch.arange(8), step=3, return_logprobs=True)
    tok0, lp0 = proxytune.sample(base, experts, antis, weights=0.0, **kwargs)
    tok1, lp1 = proxytune.sample(base, **kwargs)
    assert torch.equal(tok0, tok1) and torch.equal(lp0, lp1)
    # An expert identical to its anti-expert is the same as weight 0, whatever the weight.
    tok2 = proxytune.sample(base, [antis[0]], antis, weights=2.5, **kwargs)[0]
    assert torch.equal(tok2, tok1)


def test_combination_is_the_formula_over_the_common_vocabulary():
    base, experts, antis = proxy_inputs(3, 1010, 2, torch.float16, seed=5, expert_width=1000)
    w = torch.tensor([[0.5, 1.0, 2.0], [-0.3, 0.0, 0.7]])
    s = proxytune.combine(base, experts, antis, weights=w)
    expected = base[:, :1000].double()
    for i in range(2):
        expected = expected + w[i, :, None].double() * (experts[i].double() - antis[i].double())
    assert s.shape == (3, 1000) and s.dtype == torch.float32
    torch.testing.assert_close(s.double(), expected, rtol=1e-6, atol=1e-5)
    assert proxytune.combine(base, experts, antis, vocab_size=17).shape == (3, 17)


def test_any_minus_inf_masks_the_token():
    base = torch.zeros(1, 6)
    expert = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf"), 1.0, 0.0]])
    anti = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf"), 0.0, 0.0]])
    base[0, 5] = float("-inf")
    for w in [1.0, -1.0, 0.0]:
        s = proxytune.combine(base, [expert], [anti], weights=w)
        assert torch.isinf(s[0, 1:4]).all() and (s[0, 1:4] < 0).all() and s[0, 5] == float("-inf"), w
        tokens = proxytune.sample(base.expand(500, -1), [expert.expand(500, -1)], [anti.expand(500, -1)],
                                  weights=w, seed=torch.arange(500))  # fmt: skip
        assert set(tokens.tolist()) <= {0, 4}, w


def draws(base, n, **kwargs):
    """n independent draws of one row (seeds 0..n-1), as bincounts."""
    tokens = proxytune.sample(base.expand(n, -1), seed=torch.arange(n), **kwargs)
    return torch.bincount(tokens, minlength=base.shape[1]).numpy()


@pytest.mark.parametrize(
    "params",
    [dict(temperature=1.0), dict(temperature=0.6, top_p=0.8), dict(temperature=1.5, top_k=4), dict(min_p=0.2)],
    ids=str,
)
def test_sampled_frequencies_match_the_filtered_distribution(params):
    base = torch.randn(1, 12, generator=torch.Generator().manual_seed(6))
    n = 40_000
    counts = draws(base, n, **params)
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | params
    z, keep = keep_mask_reference(proxytune.combine(base).double(), **per_row(1, **full))
    probs = torch.softmax(torch.where(keep, z, float("-inf")), dim=1)[0].numpy()
    assert counts[probs == 0].sum() == 0, "drew a filtered-out token"
    kept = probs > 0
    assert kept.sum() >= 2
    result = scipy.stats.chisquare(counts[kept], probs[kept] * n)
    assert result.pvalue > 1e-3, (counts, probs * n)


def test_logprobs_are_the_filtered_renormalised_log_probabilities():
    base, experts, antis = proxy_inputs(6, 800, 1, seed=7)
    params = dict(temperature=0.8, top_k=100, top_p=0.9, min_p=0.01)
    tokens, logprobs = proxytune.sample(base, experts, antis, seed=9, step=2, return_logprobs=True, **params)
    s = proxytune.combine(base, experts, antis).double()
    z, keep = keep_mask_reference(s, **per_row(6, **params))
    log_q = torch.log_softmax(torch.where(keep, z, float("-inf")), dim=1)
    torch.testing.assert_close(logprobs.double(), log_q.gather(1, tokens[:, None])[:, 0], rtol=0, atol=1e-5)
    assert keep.gather(1, tokens[:, None]).all()


def test_a_row_draws_the_same_token_alone_or_anywhere_in_a_batch():
    base, experts, antis = proxy_inputs(32, 2000, 1, torch.bfloat16, seed=8)
    seeds, steps = torch.arange(100, 132), torch.arange(32) * 7
    params = dict(temperature=torch.linspace(0.5, 1.5, 32), top_p=0.9, top_k=torch.arange(32) * 3)
    batch = proxytune.sample(base, experts, antis, seed=seeds, step=steps, **params)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    shuffled = proxytune.sample(base[perm], [experts[0][perm]], [antis[0][perm]], seed=seeds[perm], step=steps[perm],
                                temperature=params["temperature"][perm], top_p=0.9, top_k=params["top_k"][perm])  # fmt: skip
    assert torch.equal(shuffled, batch[perm])
    for r in range(32):
        alone = proxytune.sample(base[r : r + 1], [experts[0][r : r + 1]], [antis[0][r : r + 1]],
                                 seed=int(seeds[r]), step=int(steps[r]), temperature=float(params["temperature"][r]),
                                 top_p=0.9, top_k=int(params["top_k"][r]))  # fmt: skip
        assert alone.item() == batch[r].item(), r


def test_a_new_step_gives_fresh_noise():
    flat = torch.zeros(1, 1000)
    tokens = torch.stack([proxytune.sample(flat, seed=5, step=t) for t in range(200)])
    assert len(set(tokens.flatten().tolist())) > 150  # a fixed step would give the same token 200 times
    again = torch.stack([proxytune.sample(flat, seed=5, step=t) for t in range(200)])
    assert torch.equal(tokens, again)


def test_default_seed_is_fresh_but_respects_torch_manual_seed():
    flat = torch.zeros(1, 100_000)
    torch.manual_seed(123)
    a = [proxytune.sample(flat).item() for _ in range(5)]
    torch.manual_seed(123)
    b = [proxytune.sample(flat).item() for _ in range(5)]
    assert a == b and len(set(a)) > 1


def test_fp64_reference_agrees_with_fp32():
    base, experts, antis = proxy_inputs(64, 4000, 1, seed=10)
    from proxytune.reference import sample_reference

    args = (base, experts, antis, torch.ones(1, 64), *per_row(64, temperature=0.7, top_k=0, top_p=0.9, min_p=0.0).values())
    t32, lp32 = sample_reference(*args, torch.arange(64), torch.zeros(64, dtype=torch.int64), 4000)
    t64, lp64 = sample_reference(*args, torch.arange(64), torch.zeros(64, dtype=torch.int64), 4000, torch.float64)
    assert torch.equal(t32, t64)
    np.testing.assert_allclose(lp32.numpy(), lp64.numpy(), atol=1e-4)

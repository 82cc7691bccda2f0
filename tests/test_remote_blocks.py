"""A served base's rows and blocks (``proxytune.remote.rows``, ``proxytune.remote.blocks``; docs/semantics.md §8).

The block math is checked without a server: a "base" with a known next-token law ``q`` (a random Markov table
over a vocabulary of 6 ids) drafts blocks; ``verify_block`` accepts or replaces; the loop runs until each of
N rows (seeds 0..N-1) has three tokens. The joint law of those three tokens is compared with the exact
proxy-tuned target on the drop (or all) row by chi-square, and a control checks that the same frequencies are
rejected against the draft's own law. Greedy blocks equal a one-token-per-request loop.
"""

import itertools
import math

import pytest
import torch

from oracle import chi2_pvalue
from proxytune.noise import gumbel, stream_seed
from proxytune.reference import combine_reference, keep_mask_reference
from proxytune.remote.blocks import (ACCEPT_STREAM, DRAFT_STREAM, RESIDUAL_STREAM, next_block_size,
                                     server_draft_seed, target_logprobs, verify_block)  # fmt: skip
from proxytune.remote.rows import check_tail, dense_rows
from proxytune.speculative import ACCEPT_STREAM as SPEC_ACCEPT, DRAFT_STREAM as SPEC_DRAFT
from proxytune.speculative import RESIDUAL_STREAM as SPEC_RESIDUAL

V = 6
N = 3000
START = 1  # the "prompt": the Markov chain's first state


# -- dense rows ----------------------------------------------------------------------------------------------


def test_dense_rows_drop_floor_all():
    topk = [{3: -0.5, 0: -1.25, 9: -0.1}, {1: -2.0, 2: float("-inf")}]  # id 9 >= V: ignored
    drop = dense_rows(topk, V, "drop")
    assert drop.dtype == torch.float32 and drop.shape == (2, V)
    assert drop[0].tolist() == [-1.25, -math.inf, -math.inf, -0.5, -math.inf, -math.inf]
    assert drop[1].tolist() == [-math.inf, -2.0, -math.inf, -math.inf, -math.inf, -math.inf]
    floor = dense_rows(topk, V, "floor")
    assert floor[0].tolist() == [-1.25, -1.25, -1.25, -0.5, -1.25, -1.25]  # the smallest returned below V
    assert floor[1].tolist() == [-2.0, -2.0, -math.inf, -2.0, -2.0, -2.0]  # -inf kept where returned
    full = {j: -float(j) for j in range(V)}
    assert dense_rows([full], V, "all")[0].tolist() == [-float(j) for j in range(V)]
    with pytest.raises(ValueError, match="tail 'all' needs every id below 6.*missing"):
        dense_rows([{j: 0.0 for j in range(V - 1)}], V, "all")
    assert dense_rows([], V).shape == (0, V)


def test_dense_rows_refuse_bad_entries():
    with pytest.raises(ValueError, match="token id must be an integer >= 0"):
        dense_rows([{-1: 0.0}], V)
    with pytest.raises(ValueError, match="token id"):
        dense_rows([{"5": 0.0}], V)
    with pytest.raises(ValueError, match="log-prob nan"):
        dense_rows([{1: float("nan")}], V)
    with pytest.raises(ValueError, match="must be one of drop, floor, all"):
        dense_rows([{1: 0.0}], V, "keep")
    with pytest.raises(ValueError, match="base_tail must be one of"):
        check_tail("ALL", "base_tail")
    with pytest.raises(ValueError, match="vocab_size"):
        dense_rows([{1: 0.0}], 0)


def test_the_all_row_gives_the_local_target():
    """With every id returned, the dense row is log_softmax(base logits), and the op's target on it equals
    the target on the raw logits (a per-row constant cancels)."""
    g = torch.Generator().manual_seed(3)
    logits, e, a = (torch.randn(4, V, generator=g) * 2 for _ in range(3))
    lsm = torch.log_softmax(logits, dim=1)
    row = dense_rows([{j: float(lsm[r, j]) for j in range(V)} for r in range(4)], V, "all")
    assert torch.equal(row, lsm)
    args = (torch.full((1, 4), 0.7), torch.full((4,), 0.9), torch.zeros(4, dtype=torch.int64), torch.full((4,), 0.9),
            torch.zeros(4))  # fmt: skip
    assert torch.allclose(target_logprobs(row, [e], [a], *args), target_logprobs(logits, [e], [a], *args), atol=1e-5)


# -- noise streams and the draft length ----------------------------------------------------------------------


def test_streams_are_new_and_the_server_seed_is_fresh_per_request():
    assert len({ACCEPT_STREAM, RESIDUAL_STREAM, DRAFT_STREAM, SPEC_DRAFT, SPEC_ACCEPT, SPEC_RESIDUAL, 0}) == 7
    seeds = [server_draft_seed(s, t) for s in range(20) for t in range(20)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**31 for x in seeds)
    assert server_draft_seed(7, 3) == server_draft_seed(7, 3)
    assert server_draft_seed(-1, 3) == server_draft_seed(2**64 - 1, 3)  # 64-bit two's-complement words


def test_next_block_size():
    assert next_block_size(4, 4, 8, 100) == 8  # all accepted: double, up to the most
    assert next_block_size(8, 8, 8, 100) == 8
    assert next_block_size(8, 0, 8, 100) == 2  # rejected at once: 2 (a + 1)
    assert next_block_size(8, 2, 8, 100) == 6
    assert next_block_size(4, 3, 8, 100) == 4  # never longer after a rejection
    assert next_block_size(1, 0, 8, 100) == 1
    assert next_block_size(4, 4, 8, 3) == 3  # never past the budget left
    assert next_block_size(4, 4, 8, 0) == 1
    with pytest.raises(ValueError):
        next_block_size(2, 3, 8, 10)


# -- the block's law ------------------------------------------------------------------------------------------


def _tables(seed: int):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(V, V, generator=g, dtype=torch.float64) * 1.2  # base logits after each last token
    expert = torch.randn(V, V, generator=g, dtype=torch.float64)
    anti = torch.randn(V, V, generator=g, dtype=torch.float64)
    return torch.log_softmax(base, dim=1), expert, anti


def _topk_row(logq: torch.Tensor, k: int) -> torch.Tensor:
    """The server's drop row: log q on its top k, -inf elsewhere (rows of ``logq``)."""
    keep = torch.zeros_like(logq, dtype=torch.bool).scatter(1, logq.topk(k, dim=1).indices, True)
    return torch.where(keep, logq, float("-inf"))


def _target(tables, k, *, weight, temperature, top_k, top_p) -> torch.Tensor:
    """p(next | last) for every last token: [V, V] fp64, exact."""
    logq, e, a = tables
    s = combine_reference(_topk_row(logq, k), [e], [a], torch.full((1, V), weight, dtype=torch.float64), V, torch.float64)
    full = lambda x, dt=torch.float64: torch.full((V,), x, dtype=dt)  # noqa: E731
    z, keep = keep_mask_reference(s, full(temperature), full(top_k, torch.int64), full(top_p), full(0.0))
    return torch.softmax(torch.where(keep, z, float("-inf")), dim=1)


def _run_blocks(tables, k, n, *, weight, temperature, top_k, top_p, n_tokens=3, rows=N):
    """Every row (seed r) generates ``n_tokens`` through base-drafted blocks of ``n``; the rows' tokens."""
    logq, e, a = (t.float() for t in tables)
    seeds = torch.arange(rows, dtype=torch.int64)
    out = [[] for _ in range(rows)]
    last = torch.full((rows,), START, dtype=torch.int64)
    rounds = 0
    while True:
        live = torch.tensor([len(o) < n_tokens for o in out])
        if not live.any():
            return out, rounds
        rounds += 1
        idx = live.nonzero()[:, 0]
        step = torch.tensor([len(out[i]) for i in idx.tolist()], dtype=torch.int64)
        # the "server": n drafts from q (temperature 1, no filters), its own noise per (row, step)
        drafts, prev, rows_q, ex, an = [], last[idx], [], [], []
        for i in range(n):
            g = gumbel(stream_seed(seeds[idx], 99)[:, None], (step + i)[:, None], torch.arange(V)[None, :])
            rows_q.append(_topk_row(logq[prev], k))
            ex.append(e[prev])
            an.append(a[prev])
            d = (logq[prev] + g).argmax(dim=1) if temperature > 0 else logq[prev].argmax(dim=1)
            drafts.append(d)
            prev = d
        draft_ids = torch.stack(drafts, dim=1)
        verdict = verify_block(
            draft_ids, torch.stack(rows_q, dim=1), [torch.stack(ex, dim=1)], [torch.stack(an, dim=1)], [weight],
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seeds[idx], step=step,
        )  # fmt: skip
        for j, toks in zip(idx.tolist(), verdict.tokens(draft_ids)):
            out[j].extend(toks)
            out[j] = out[j][:n_tokens]
            last[j] = out[j][-1]


def _joint(p: torch.Tensor) -> dict:
    return {(x, y, z): float(p[START, x] * p[x, y] * p[y, z]) for x, y, z in itertools.product(range(V), repeat=3)}


CONFIGS = [  # (table seed, k, n, weight, temperature, top_k, top_p)
    (0, 4, 3, 1.0, 1.0, 0, 1.0),  # drop: drafts outside K are always rejected
    (3, 4, 2, 0.5, 1.2, 0, 0.85),  # drop + top-p + temperature
    (2, V, 4, 1.0, 1.3, 3, 1.0),  # all + top-k
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["drop", "drop-top_p", "all-top_k"])
def test_blocks_sample_the_target_exactly(cfg):
    table_seed, k, n, weight, temperature, top_k, top_p = cfg
    tables = _tables(table_seed)
    kw = dict(weight=weight, temperature=temperature, top_k=top_k, top_p=top_p)
    out, rounds = _run_blocks(tables, k, n, **kw)
    counts: dict = {}
    for row in out:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    target = _joint(_target(tables, k, **kw))
    assert chi2_pvalue(counts, target, N) > 1e-4
    # the control: the draft's own law (the base's q, renormalised: no proxy-tuning) must be rejected
    q = torch.softmax(tables[0], dim=1)
    assert chi2_pvalue(counts, _joint(q), N) < 1e-6
    assert rounds < 3 * 2  # fewer requests than one per token for the slowest row... and bounded


def test_sampled_blocks_repeat_with_the_seed_and_take_fewer_requests_than_tokens():
    tables = _tables(0)
    kw = dict(weight=0.3, temperature=1.0, top_k=0, top_p=1.0)
    a, _ = _run_blocks(tables, V, 4, n_tokens=8, rows=200, **kw)
    b, _ = _run_blocks(tables, V, 4, n_tokens=8, rows=200, **kw)
    assert a == b
    # acceptance is high where the target is close to the draft: a round gives more than one token on average
    _, rounds = _run_blocks(tables, V, 8, n_tokens=8, rows=1, **kw)
    assert rounds <= 8


def test_greedy_blocks_equal_the_one_token_loop():
    tables = _tables(4)
    logq, e, a = (t.float() for t in tables)
    k, w, steps = 3, 1.5, 12
    # one token per request: the target's argmax on the drop row
    ref, last = [], START
    for _ in range(steps):
        s = combine_reference(_topk_row(logq[last : last + 1], k), [e[last : last + 1]], [a[last : last + 1]],
                              torch.full((1, 1), w), V)  # fmt: skip
        last = int(s.argmax())
        ref.append(last)
    # blocks of 4 greedy drafts (the base's argmax)
    got, last, rounds = [], START, 0
    while len(got) < steps:
        rounds += 1
        drafts, prev = [], last
        rows, ex, an = [], [], []
        for _ in range(4):
            rows.append(_topk_row(logq[prev : prev + 1], k)[0])
            ex.append(e[prev])
            an.append(a[prev])
            prev = int(logq[prev].argmax())
            drafts.append(prev)
        draft_ids = torch.tensor([drafts])
        v = verify_block(draft_ids, torch.stack(rows)[None], [torch.stack(ex)[None]], [torch.stack(an)[None]], [w],
                         temperature=0.0, seed=123, step=len(got))  # fmt: skip
        toks = v.tokens(draft_ids)[0]
        assert v.logprobs[0, : len(toks)].eq(0).all()  # greedy rows: log-prob 0
        got.extend(toks)
        last = got[-1]
    assert got[:steps] == ref
    assert rounds < steps


def test_verdict_edge_cases():
    """A draft outside K (or >= V) is rejected; lengths cut the block; all accepted gives no extra token."""
    row = torch.full((1, 2, V), float("-inf"))
    row[0, :, :3] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    zeros = torch.zeros(1, 2, V)
    for bad in (4, V + 3):
        v = verify_block(torch.tensor([[bad, 0]]), row, [zeros], [zeros], [1.0], temperature=1.0, seed=0)
        assert v.accepted.tolist() == [0] and 0 <= int(v.token) < 3  # the residual: p itself (q = 0 there)
        assert v.logprobs[0, 0] <= 0 and math.isnan(v.logprobs[0, 1])
    # the target equals the draft law (no expert difference, T = 1): every draft passes (p / q = 1)
    v = verify_block(torch.tensor([[0, 1]]), row, [zeros], [zeros], [1.0], temperature=1.0, seed=5)
    assert v.accepted.tolist() == [2] and v.token.tolist() == [-1]
    v = verify_block(torch.tensor([[0, 1]]), row, [zeros], [zeros], [1.0], temperature=1.0, seed=5,
                     lengths=torch.tensor([1]))
    assert v.accepted.tolist() == [1] and v.token.tolist() == [-1]
    with pytest.raises(ValueError, match=r"base_rows must be \[B, n, V\]"):
        verify_block(torch.tensor([[0, 1]]), row[:, :1], [zeros], [zeros], [1.0], temperature=1.0)
    with pytest.raises(ValueError, match="expert/anti-expert logits"):
        verify_block(torch.tensor([[0, 1]]), row, [zeros[:, :, :3]], [zeros], [1.0], temperature=1.0)


def test_a_wrong_residual_is_caught(monkeypatch):
    """The test can see a subtle mistake: drawing the replacement from p instead of max(0, p - q) biases the
    law toward the draft's favourites, and the chi-square rejects it."""
    import proxytune.remote.blocks as blocks

    monkeypatch.setattr(blocks, "residual_logits", lambda logp, logq: logp.float())
    table_seed, k, n, weight, temperature, top_k, top_p = CONFIGS[0]
    tables = _tables(table_seed)
    kw = dict(weight=weight, temperature=temperature, top_k=top_k, top_p=top_p)
    out, _ = _run_blocks(tables, k, n, **kw)
    counts: dict = {}
    for row in out:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert chi2_pvalue(counts, _joint(_target(tables, k, **kw)), N) < 1e-4

"""What every backend must do, in one place: one filter table, one (dtype, atol, rtol) table, one comparison.

``tests/test_backend_conformance.py`` runs every registered backend over them against the reference; the
per-backend files keep only what is specific to a backend (tiles and fallbacks, threads, builds) and take
their filters from here too.

Tolerances: every backend computes the combined logits in fp32 exactly as the reference does (same order of
additions, no fused multiply-add), so tokens must be equal; a log-probability ``z - ln Z`` differs only by
the summation order of ``Z`` (and exp/log rounding): a few ulps of ``ln Z`` for the peaked rows of
:func:`proxytune.testing.proxy_inputs`, far inside ``atol = 2e-5`` (the order-independent bound on a sum of
n terms, ``gamma_n``, is what ``tests/test_reference.py`` uses where masses near a cut matter).
"""

from __future__ import annotations

import math

import torch

import proxytune
from proxytune.reference import keep_mask_reference

# (temperature, top_k, top_p, min_p): greedy, every filter alone, in pairs, all together, and none
FILTERS = [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7),
    dict(temperature=0.7, top_p=0.9),
    dict(temperature=1.0, top_p=0.5),
    dict(temperature=1.3, top_p=0.99),
    dict(temperature=1.0, top_k=1),
    dict(temperature=0.8, top_k=50),
    dict(temperature=1.2, top_k=20),
    dict(temperature=0.7, top_k=50, top_p=0.9),
    dict(temperature=0.7, top_k=40, top_p=0.95),
    dict(temperature=1.5, top_k=2000, top_p=0.95),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=1.3, min_p=0.05),
    dict(temperature=1.0, top_p=0.9, min_p=0.1),
    dict(temperature=1.0, top_k=40, min_p=0.2),
    dict(temperature=1.5, top_k=10, min_p=0.1),
    dict(temperature=1.0, top_k=30, top_p=0.8, min_p=0.02),
    dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.01),
    dict(temperature=0.0, top_k=5, top_p=0.5, min_p=0.1),  # greedy ignores the filters
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_k=50, top_p=0.95),
    dict(temperature=0.8, top_k=40, top_p=0.8, min_p=0.1),
    dict(temperature=1.0, top_k=5),
]

# (logits dtype, atol, rtol) for log-probabilities against the reference (see the module docstring)
DTYPES = [(torch.float32, 2e-5, 1e-5), (torch.bfloat16, 2e-5, 1e-5), (torch.float16, 2e-5, 1e-5)]


def filter_id(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def as_tuple(params: dict) -> tuple[float, int, float, float]:
    """``(temperature, top_k, top_p, min_p)`` with the op's defaults for the filters not named."""
    return (params["temperature"], params.get("top_k", 0), params.get("top_p", 1.0), params.get("min_p", 0.0))


U32, U64 = 2.0**-24, 2.0**-53  # unit roundoffs of fp32 and fp64


def gamma(n, u):
    """Higham's ``gamma_n = n u / (1 - n u)`` (``n`` a number or a tensor)."""
    return n * u / (1 - n * u)


def per_row(batch, **params):
    """Scalar filter parameters as the reference's ``[B]`` tensors."""
    return {k: torch.full((batch,), v, dtype=torch.int64 if k == "top_k" else torch.float32) for k, v in params.items()}


def mass_above(s, temperature, top_k):
    """fp64 probability mass strictly above each token, renormalised over the top-k survivors.

    Returns ``(mass, z, n, mean_abs_z)``: the mass ``[B, V]``, the scaled logits ``z`` of the top-k survivors
    (0 elsewhere), and per row ``[B, 1]`` the number of finite terms of the softmax (the survivors) and the
    mean ``|z|`` under it, which :func:`mass_tolerance` needs."""
    z, keep = keep_mask_reference(s, **per_row(s.shape[0], temperature=temperature, top_k=top_k, top_p=1.0, min_p=0.0))
    q = torch.softmax(torch.where(keep, z, float("-inf")), dim=1)
    q_sorted, order = q.sort(dim=1, descending=True)
    above = torch.nn.functional.pad(q_sorted.cumsum(dim=1)[:, :-1], (1, 0))
    mean_abs_z = (q * torch.where(keep, z, 0.0).abs()).sum(dim=1, keepdim=True)
    return torch.empty_like(above).scatter_(1, order, above), torch.where(keep, z, 0.0), keep.sum(dim=1, keepdim=True), mean_abs_z


def mass_tolerance(n, z, mean_abs_z, u=U32):
    """How far a top-p mass computed in a floating type of unit roundoff ``u`` may lie from the exact one,
    whatever the summation order (torch picks AVX2, AVX-512 or scalar kernels by CPU; ATEN_CPU_CAPABILITY
    forces one, and each adds the terms in its own order and grouping; the backends add in their own).

    A sum of ``n`` non-negative terms, added in any order and grouping, errs by at most ``gamma_{n-1}`` times
    the exact sum: each term passes through at most ``n - 1`` roundings (Higham, *Accuracy and Stability of
    Numerical Algorithms*, 2nd ed., section 4.2). The mass strictly above token ``j`` is the exclusive
    cumulative sum of ``q_i = exp(z_i) / Z`` over the ``n`` finite terms of the row's softmax, so:

    * the normaliser ``Z = sum_i exp(z_i)`` is off by ``gamma_{n-1}`` relative, a factor common to every
      ``q_i``: at most ``gamma_{n-1}`` on a mass <= 1;
    * the cumulative sum adds at most ``n - 1`` terms whose sum is <= 1: ``gamma_{n-1}`` absolute;
    * ``z = (s - m) / T`` is rounded twice (``2u`` relative), which moves ``exp(z_i)`` by ``2u |z_i|``
      relative: ``2u E_q|z|`` through ``Z`` and at most ``2u |z_j|`` on the tokens above ``j`` (their
      ``z_i >= z_j``);
    * ``exp`` and the division: a couple of ulps per term, ``4u`` on the mass.

    Returns ``2 gamma_{n-1} + (4 + 2 E_q|z| + 2 |z_j|) u`` per token. It is a worst case, so for a
    151,936-token row in fp32 it is about 0.018 where real CPUs err by ~4e-5; it holds on every CPU, and a
    keep set wrong by more than it still fails (test_reference.py: test_keep_set_check_catches_a_wrong_cut).
    """
    return 2 * gamma((n - 1).clamp(min=0).double(), u) + (4 + 2 * mean_abs_z + 2 * z.abs()) * u


def _a_cut_flip(base, experts, antis, params, row: int, token: int, lp: float, ref_lp: float, atol: float) -> bool:
    """Whether two log-probabilities of the same token differ by exactly one top-p boundary token's share, that
    token's mass above lying within fp32 rounding of ``top_p`` (:func:`mass_tolerance`): the two sides then
    legitimately cut the nucleus on either side of it (docs/semantics.md, rounding at exact boundaries)."""
    t, k, p, _ = as_tuple(params)
    weights = params.get("weights", 1.0)
    if not (t > 0 and 0 < p < 1) or not isinstance(weights, float):
        return False
    s = proxytune.combine(base[row : row + 1], [x[row : row + 1] for x in experts], [x[row : row + 1] for x in antis],
                          weights=weights, backend="reference").double()  # fmt: skip
    mass, z, n, mean_abs_z = mass_above(s, t, k)
    near = ((mass - p).abs() <= mass_tolerance(n, z, mean_abs_z)) & (z != 0)
    q = torch.softmax(torch.where(torch.isfinite(s), (s - s.max()) / t, float("-inf")), dim=1)[0]
    # lp = ln(e_token / Z_keep): one more token j in the nucleus moves it by ln(1 + e_j / Z_keep), with
    # e_j / Z_keep = (q_j / q_token) * exp(lp) on the side with the smaller nucleus (the larger lp)
    share = math.exp(max(lp, ref_lp)) / q[token].item()
    return any(abs(abs(lp - ref_lp) - math.log1p(q[j].item() * share)) <= 10 * atol for j in near[0].nonzero()[:, 0].tolist())


def assert_matches_reference(backend: str, base, experts=(), antis=(), *, seeds=range(3), atol=2e-5, rtol=1e-5,
                             validate=True, **params) -> None:  # fmt: skip
    """``backend`` draws the reference's tokens for every seed, with log-probabilities within the tolerance,
    except a row whose two sides cut the nucleus on either side of a token that lies on the boundary within
    fp32 rounding (checked by :func:`_a_cut_flip`)."""
    for seed in seeds:
        kw = dict(seed=seed, return_logprobs=True, validate=validate, **params)
        ref_tokens, ref_lp = proxytune.sample(base, experts, antis, backend="reference", **kw)
        tokens, lp = proxytune.sample(base, experts, antis, backend=backend, **kw)
        assert tokens.dtype == torch.int64 and lp.dtype == torch.float32
        assert torch.equal(tokens, ref_tokens), f"seed {seed}: reference {ref_tokens.tolist()} vs {backend} {tokens.tolist()}"
        far = ~torch.isclose(lp, ref_lp, atol=atol, rtol=rtol, equal_nan=True)
        for row in far.nonzero()[:, 0].tolist():
            assert _a_cut_flip(base, experts, antis, params, row, tokens[row].item(), lp[row].item(), ref_lp[row].item(), atol), (
                f"seed {seed} row {row}: {backend} logprob {lp[row].item()} vs reference {ref_lp[row].item()}"
            )


# The host-known batch flags of proxytune.sample: (per-row tensor parameters of a 3-row batch, the filters_used
# promise that covers them, the filters some row uses). Row 1 of each is greedy: a greedy row uses no filter.
FLAG_CASES = [
    (dict(temperature=[0.8, 0.0, 1.1], top_p=[0.9, 0.5, 1.0]), {"top_p"}),
    (dict(temperature=[1.0, 0.0, 0.7], top_k=[40, 5, 0]), {"top_k"}),
    (dict(temperature=[1.2, 0.0, 1.0], min_p=[0.05, 0.5, 0.0]), {"min_p"}),
    (dict(temperature=[0.9, 0.0, 1.0], top_k=[30, 0, 0], top_p=[0.8, 1.0, 0.95]), {"top_k", "top_p"}),
    (dict(temperature=[1.0, 0.0, 1.3]), set()),
]


def flag_params(params: dict, batch: int, device) -> dict:
    """A :data:`FLAG_CASES` row as ``[B]`` tensors (rows repeated to ``batch``) with the op's other defaults."""
    full = dict(temperature=[1.0] * 3, top_k=[0] * 3, top_p=[1.0] * 3, min_p=[0.0] * 3)
    full.update(params)
    return {
        k: torch.tensor([v[i % 3] for i in range(batch)], dtype=torch.int64 if k == "top_k" else torch.float32, device=device)
        for k, v in full.items()
    }


def assert_flags_conform(backend: str, base, experts, antis, params: dict, used: set, seed: int = 5) -> None:
    """The batch flags change no token of ``backend``: ``filters_used`` that covers the rows, and
    ``return_logprobs=False``, draw what the backend draws without them (and what the reference draws)."""
    kw = dict(seed=seed, step=3, **flag_params(params, base.shape[0], base.device))
    ref_tokens, ref_lp = proxytune.sample(base, experts, antis, backend="reference", return_logprobs=True, **kw)
    tokens, lp = proxytune.sample(base, experts, antis, backend=backend, return_logprobs=True, filters_used=frozenset(used), **kw)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=1e-5)
    for filters_used in (None, frozenset(used)):
        plain = proxytune.sample(base, experts, antis, backend=backend, filters_used=filters_used, **kw)
        assert torch.equal(plain, ref_tokens)

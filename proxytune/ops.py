"""The public ops: :func:`sample` (combine, filter, draw) and :func:`combine` (the combined logits)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from proxytune import backends
from proxytune import _reference_backend, _cpu_backend, _triton_backend  # noqa: F401  (each registers itself)
from proxytune._args import PerRow, normalize

__all__ = ["sample", "combine"]

Weights = Union[PerRow, Sequence[PerRow], torch.Tensor]


def sample(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor] = (),
    anti_experts: Sequence[torch.Tensor] = (),
    *,
    weights: Weights = 1.0,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    min_p: PerRow = 0.0,
    seed: Optional[PerRow] = None,
    step: PerRow = 0,
    vocab_size: Optional[int] = None,
    return_logprobs: bool = False,
    backend: str = "auto",
    validate: bool = True,
    filters_used: Optional[frozenset] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Draw one token per row from the proxy-tuned distribution.

    Computes ``s = base + sum_i w_i * (experts[i] - anti_experts[i])`` in fp32 over the common vocabulary,
    applies temperature, top-k, top-p and min-p (in that order, as Hugging Face does) and draws by
    Gumbel-max with counter-based Philox noise. The exact semantics are in ``docs/semantics.md``.

    Parameters
    ----------
    base : Tensor [B, Vb], float32 / bfloat16 / float16
        Logits of the base model. Entries may be -inf (masked).
    experts, anti_experts : sequences of Tensor [B, Vx]
        Logits of the tuned experts and their untuned anti-experts, pairwise; any mix of dtypes and widths.
        Empty sequences sample from the base alone.
    weights : float, Tensor [B], sequence of those (one per pair), or Tensor [P, B]
        The weight ``w_i`` of each pair (``alpha`` in the paper). Default 1.0.
    temperature : float or Tensor [B]
        >= 0. Zero means greedy: the first index of the maximum, whatever the filters.
    top_k : int or Tensor [B] (integer)
        Keep the tokens whose scaled logit is >= the k-th largest (ties kept). 0 disables.
    top_p : float or Tensor [B]
        In (0, 1]. Keep token j iff the probability mass, renormalised over the top-k survivors, of the
        tokens strictly above j is < top_p (ties at the boundary kept). 1.0 disables.
    min_p : float or Tensor [B]
        In [0, 1). Keep token j iff its probability is >= min_p times the largest. 0 disables.
    seed, step : int or Tensor [B] (integer)
        The noise for row r and token j is a pure function of ``(seed[r], step[r], j)``: a row draws the
        same token whatever batch it sits in, on every backend. Use a new ``step`` for each decoding
        step. ``seed=None`` (default) draws a fresh seed from torch's default generator.
    vocab_size : int, optional
        The common vocabulary ``V``; defaults to the narrowest width. Columns past ``V`` are ignored.
    return_logprobs : bool
        Also return the log-probability of each drawn token under the final filtered, renormalised
        distribution (0 for greedy rows). Without it no backend computes log-probabilities.
    backend : {"auto", "reference", "cpu", "triton"}
        ``auto`` picks the fastest verified backend for the logits' device: ``cpu`` (the C++ extension) on
        CPU, ``triton`` (the fused kernel) on CUDA once a GPU run has verified it (``proxytune/_verified.py``;
        until then ``reference``), else ``reference`` (pure PyTorch, the specification) with one warning. A named backend that is unavailable raises
        :class:`proxytune.backends.BackendUnavailableError`.
    validate : bool
        Check parameter tensors and logits for invalid values (NaN, +inf, out-of-range parameters, rows
        with every token masked) and raise ``ValueError`` naming the argument. These checks sync with the
        device (they cost one max reduction per logits tensor, plus a look at the result for a fully masked
        row); pass False inside CUDA graphs. Without them invalid entries are treated as masked and the
        result is still a token id in ``[0, V)``.
    filters_used : frozenset of {"top_k", "top_p", "min_p"}, optional
        The caller's host-side promise of the filters that some row uses (an engine knows it from its
        requests when the batch forms; no device sync). A filter left out is off in every row: the Triton
        kernel compiles it out even when its parameter is a ``[B]`` tensor, and the C++ op skips it. With
        ``validate=True`` a sampled row (temperature > 0) whose parameter turns on a filter left out raises
        ``ValueError``; with ``validate=False`` the promise is trusted and that filter's parameter is ignored
        (the result is still a valid token id). None (default): inferred from Python scalars alone.

    Returns
    -------
    token_ids : Tensor [B], int64, on the logits' device
    logprobs : Tensor [B], float32 (only with ``return_logprobs=True``)
    """
    args = normalize(
        base, experts, anti_experts, weights=weights, temperature=temperature, top_k=top_k, top_p=top_p,
        min_p=min_p, seed=seed, step=step, vocab_size=vocab_size, validate=validate, filters_used=filters_used,
        logprobs=bool(return_logprobs),
    )  # fmt: skip
    tokens, logprobs = backends.resolve(backend, args.base.device).sample(args)
    if validate:  # every backend returns logprob NaN exactly for a row with no finite combined logit (also
        # without return_logprobs: then that marker is all it computes)
        _check_not_fully_masked(logprobs)
    return (tokens, logprobs) if return_logprobs else tokens


def combine(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor] = (),
    anti_experts: Sequence[torch.Tensor] = (),
    *,
    weights: Weights = 1.0,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """The combined logits ``s = base + sum_i w_i * (experts[i] - anti_experts[i])`` as :func:`sample` sees them.

    Parameters are as for :func:`sample`. Entries that are not finite (a token masked with -inf by any
    model) are -inf.

    Returns
    -------
    Tensor [B, V], float32, on the logits' device (a new tensor).
    """
    args = normalize(
        base, experts, anti_experts, weights=weights, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
        seed=0, step=0, vocab_size=vocab_size, validate=validate,
    )  # fmt: skip
    return backends.resolve(backend, args.base.device).combine(args)


def _check_not_fully_masked(logprobs: torch.Tensor) -> None:
    dead = torch.isnan(logprobs)
    if bool(dead.any()):
        row = int(dead.nonzero()[0, 0])
        raise ValueError(f"row {row} has no finite combined logit: every token is masked, nothing can be sampled")

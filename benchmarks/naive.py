"""The baseline every backend is measured against: proxy-tuned sampling the way research code does it.

Combine the logits in fp32 over the common vocabulary, divide by the temperature, filter with the
Hugging Face sort-based top-p (``TopPLogitsWarper``), softmax and ``torch.multinomial``. Each step is a
separate PyTorch op that writes a ``[B, V]`` tensor, and top-p sorts the whole row. This is the naive
pipeline; it is not the op's exact semantics (``docs/semantics.md``): HF's top-p compares cumulative
masses with ``<= 1 - p`` from the bottom of the ascending sort, and the draw uses torch's RNG, so its
tokens differ from the backends' draw for draw while the distribution is (up to rounding) the same.

Host syncs: ``torch.multinomial`` (on CUDA it syncs to check its input).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["naive_combine", "hf_top_p", "naive_sample"]


def naive_combine(
    base: torch.Tensor, experts: Sequence[torch.Tensor], antis: Sequence[torch.Tensor], weight: float = 1.0
) -> torch.Tensor:
    """``base + weight * sum_i (experts[i] - antis[i])`` in fp32 over the narrowest width: ``[B, V]``."""
    vocab = min(x.shape[-1] for x in (base, *experts, *antis))
    s = base[:, :vocab].float()
    for expert, anti in zip(experts, antis):
        s = s + weight * (expert[:, :vocab].float() - anti[:, :vocab].float())
    return s


def hf_top_p(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Hugging Face's ``TopPLogitsWarper``: mask with -inf the tokens outside the nucleus (a new tensor)."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    sorted_indices_to_remove = cumulative_probs <= (1 - top_p)
    sorted_indices_to_remove[..., -min_tokens_to_keep:] = 0  # keep at least the largest
    indices_to_remove = sorted_indices_to_remove.scatter(1, sorted_indices, sorted_indices_to_remove)
    return scores.masked_fill(indices_to_remove, float("-inf"))


def naive_sample(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    antis: Sequence[torch.Tensor],
    weight: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token per row from ``softmax(top_p(combine(...) / temperature))``, drawn by ``torch.multinomial``.

    Parameters
    ----------
    base : Tensor [B, Vb]; experts, antis : sequences of Tensor [B, Vx], pairwise
        Logits in any float dtype, all on one device.
    weight : float
        The weight of every expert pair. temperature : float, 0 = greedy. top_p : float in (0, 1], 1 = off
        (as in HF, which then skips the warper).
    generator : torch.Generator, optional
        For ``torch.multinomial``.

    Returns
    -------
    Tensor [B], int64, on the logits' device.
    """
    scores = naive_combine(base, experts, antis, weight)
    if temperature == 0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if top_p < 1.0:
        scores = hf_top_p(scores, top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)

"""Input generators shared by the tests and the benchmarks (and useful for checking a backend of your own)."""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["peaked_logits", "proxy_inputs", "ForwardInputs"]


def peaked_logits(
    batch: int,
    width: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    generator: Optional[torch.Generator] = None,
    scale: float = 3.0,
) -> torch.Tensor:
    """Logits shaped like a language model's: a heavy-tailed spread with a few dominant tokens per row.

    Gaussian logits times ``scale`` plus a Zipf-like bonus on a random handful of tokens, so top-p 0.9
    keeps tens to hundreds of tokens, not the whole vocabulary (uniform noise would be unrealistic).
    Returns ``[batch, width]`` in ``dtype`` on ``device``; values are drawn on the CPU with ``generator``.
    """
    logits = torch.randn(batch, width, generator=generator) * scale
    n_top = min(width, 16)
    top = torch.rand(batch, width, generator=generator).argsort(dim=1)[:, :n_top]
    bonus = 4.0 * scale / torch.arange(1, n_top + 1, dtype=torch.float32)
    logits.scatter_add_(1, top, bonus.expand(batch, n_top).contiguous())
    return logits.to(dtype=dtype, device=device)


def proxy_inputs(
    batch: int,
    width: int,
    n_pairs: int = 1,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    expert_width: Optional[int] = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(base, experts, anti_experts)`` of peaked logits; experts are ``expert_width`` wide (default ``width``).

    Each expert is its anti-expert plus a peaked shift, as a tuned model differs from its base.
    """
    g = torch.Generator().manual_seed(seed)
    xw = expert_width or width
    base = peaked_logits(batch, width, dtype, device, g)
    antis = [peaked_logits(batch, xw, torch.float32, "cpu", g) for _ in range(n_pairs)]
    experts = [(a + peaked_logits(batch, xw, torch.float32, "cpu", g, scale=1.0)).to(dtype=dtype, device=device) for a in antis]
    antis = [a.to(dtype=dtype, device=device) for a in antis]
    return base, experts, antis


class ForwardInputs:
    """Records the ``input_ids`` of every forward call of a module (a forward pre-hook), for tests and
    benchmarks that check what a model was fed: ``seen`` holds copies, ``sizes`` the rows of each call.
    Call :meth:`remove` when done (or use it as a context manager)."""

    def __init__(self, module: torch.nn.Module):
        self.seen: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.seen.append(kwargs["input_ids"].detach().clone())

    @property
    def sizes(self) -> list[int]:
        """The batch size (rows) of each recorded call."""
        return [ids.shape[0] for ids in self.seen]

    def remove(self) -> None:
        self.handle.remove()

    def __enter__(self) -> "ForwardInputs":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

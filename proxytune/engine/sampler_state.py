"""The sampler's per-row state (:class:`SamplerState`): the requests' sampling parameters as device tensors,
the form ``proxytune.sample`` takes and a CUDA graph can hold (``step`` advances in place), and the batch
flags the host knows when the batch forms (which filters any row uses, whether log-probabilities are read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import torch

from proxytune.engine.ensemble import split_roles
from proxytune._rules import check_weights
from proxytune.engine.runner import to_device
from proxytune.ops import sample as proxy_sample

if TYPE_CHECKING:
    from proxytune.engine.requests import SamplingParams

__all__ = ["SamplerState"]


@dataclass
class SamplerState:
    """Per-row sampling parameters as device tensors, the form ``proxytune.sample`` takes and a graph can hold.

    The one definition of the sampler's per-row state: the eager loop keeps one for its live rows, the static
    decoder one of its capacity (rows past the batch are neutral padding: greedy, no filter, weight 0).
    """

    weights: torch.Tensor  # [P, B] fp32
    temperature: torch.Tensor  # [B] fp32
    top_k: torch.Tensor  # [B] int64
    top_p: torch.Tensor  # [B] fp32
    min_p: torch.Tensor  # [B] fp32
    seed: torch.Tensor  # [B] int64
    step: torch.Tensor  # [B] int64: tokens generated so far by the row
    # Host-known batch flags, per row, decided from the requests when the batch forms (never read back from
    # the device); None where the rows are not known on the host (the static decoder's capacity, whose rows
    # change under captured graphs): the op then infers them as before.
    sampled: Optional[tuple[bool, ...]] = None  # temperature > 0
    filters: Optional[tuple[frozenset, ...]] = None  # the filters each row turns on

    ROWS: ClassVar = ("temperature", "top_k", "top_p", "min_p", "seed", "step")  # the [B] fields; weights is [P, B]
    NEUTRAL: ClassVar = {"weights": 0.0, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 0, "step": 0}
    DTYPES: ClassVar = {"weights": torch.float32, "temperature": torch.float32, "top_k": torch.int64, "top_p": torch.float32,
              "min_p": torch.float32, "seed": torch.int64, "step": torch.int64}  # fmt: skip

    @classmethod
    def for_requests(
        cls, params: Sequence["SamplingParams"], seeds: Sequence[int], weights: Sequence[float], device: torch.device
    ) -> "SamplerState":
        """The state of checked requests ``params`` with ``seeds``; ``weights``: the tuner's, per pair, for
        requests that name none. Host to device: one small copy per field, no sync."""
        n_pairs = len(weights)
        per_row = [list(weights) if p.weights is None else check_weights(p.weights, n_pairs) for p in params]
        values = {name: [getattr(p, name) for p in params] for name in ("temperature", "top_k", "top_p", "min_p")}
        values["seed"], values["step"] = list(seeds), [0] * len(params)
        tensors = {name: torch.tensor(v, dtype=cls.DTYPES[name]).to(device) for name, v in values.items()}
        w = torch.tensor(per_row, dtype=torch.float32).reshape(len(params), n_pairs).T.contiguous().to(device)
        return cls(weights=w, **tensors, sampled=tuple(p.sampled for p in params),
                   filters=tuple(p.filters_used() for p in params))  # fmt: skip

    @property
    def any_sampled(self) -> bool:
        """Whether some row draws at random (host-known; True where unknown)."""
        return True if self.sampled is None else any(self.sampled)

    @property
    def filters_used(self) -> Optional[frozenset]:
        """The filters some row turns on (host-known), as ``proxytune.sample``'s ``filters_used``; None where
        unknown."""
        return None if self.filters is None else frozenset().union(*self.filters)

    @classmethod
    def neutral(cls, n_pairs: int, capacity: int, device: torch.device) -> "SamplerState":
        """``capacity`` rows of padding (greedy, no filter, weight 0)."""
        state = cls(weights=torch.empty(n_pairs, capacity, device=device),
                    **{n: torch.empty(capacity, dtype=cls.DTYPES[n], device=device) for n in cls.ROWS})  # fmt: skip
        state.fill_neutral_()
        return state

    def fill_neutral_(self) -> None:
        for name, value in self.NEUTRAL.items():
            getattr(self, name).fill_(value)

    def head(self, b: int) -> "SamplerState":
        """Views of rows ``[0, b)`` (writes go through)."""
        return SamplerState(weights=self.weights[:, :b], **{n: getattr(self, n)[:b] for n in self.ROWS})

    def select(self, rows: torch.Tensor, kept: Sequence[int]) -> None:
        """Keep only ``rows`` (int64 indices; ``kept``: the same on the host), in that order (new tensors)."""
        if self.sampled is not None:
            self.sampled = tuple(self.sampled[j] for j in kept)
        if self.filters is not None:
            self.filters = tuple(self.filters[j] for j in kept)
        self.weights = self.weights[:, rows]
        for name in self.ROWS:
            setattr(self, name, getattr(self, name)[rows])

    def load_(self, other: "SamplerState") -> None:
        """Copy ``other``'s rows into the first rows; the rest become neutral padding."""
        self.fill_neutral_()
        b = other.temperature.shape[0]
        self.weights[:, :b].copy_(other.weights)
        for name in self.ROWS:
            getattr(self, name)[:b].copy_(getattr(other, name))

    def compact_(self, rows: torch.Tensor, b: int) -> None:
        """Move rows ``rows`` (indices into ``[0, b)``) to the front, in place."""
        n = rows.shape[0]
        self.weights[:, :n].copy_(self.weights[:, :b].index_select(1, rows))
        for name in self.ROWS:
            t = getattr(self, name)
            t[:n].copy_(t[:b].index_select(0, rows))

    def sample(
        self, logits: Sequence[torch.Tensor], *, vocab_size: int, backend: str, return_logprobs: bool, validate: bool
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One ``proxytune.sample`` call: ``logits`` = the base's, the experts', then the anti-experts' ``[B, W]``
        (moved to this state's device where needed). ``(tokens int64 [B], logprobs fp32 [B] or None)``; no
        host sync unless ``validate`` (the first step's checks)."""
        base, experts, anti_experts = split_roles([to_device(x, self.step.device) for x in logits], self.weights.shape[0])
        out = proxy_sample(
            base, experts, anti_experts, weights=self.weights, temperature=self.temperature,
            top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, seed=self.seed, step=self.step,
            vocab_size=vocab_size, return_logprobs=return_logprobs, backend=backend, validate=validate,
            filters_used=self.filters_used,
        )  # fmt: skip
        return out if return_logprobs else (out, None)

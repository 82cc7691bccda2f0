"""The eager decoder: one step per launch, each model's growing ``DynamicCache``, finished rows dropped at once.

It reads like gpt-fast's ``decode_n_tokens``: feed the last tokens to every model, sample, and hand the
tokens to the loop (:mod:`proxytune.engine.loop`), which reads them at once (one host sync per token).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from proxytune.engine.runner import ModelRunner
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.loop import Chunk

__all__ = ["EagerDecoder"]


class EagerDecoder:
    """Decode steps over prefilled :class:`~proxytune.engine.runner.ModelRunner` s.

    Parameters
    ----------
    runners : the base's, the experts', then the anti-experts' runners, prefilled
    state : the rows' sampler state (``step`` already counts the first token)
    tokens : the first drawn token of each row ``[B]`` int64 on the sampler's device
    vocab_size, backend, return_logprobs : for ``proxytune.sample``
    """

    pipelined = False

    def __init__(self, runners: Sequence[ModelRunner], state: SamplerState, tokens: torch.Tensor, *, vocab_size: int,
                 backend: str, return_logprobs: bool):  # fmt: skip
        self.runners, self.state, self.tokens = list(runners), state, tokens
        self.vocab_size, self.backend, self.return_logprobs = vocab_size, backend, return_logprobs
        self.slots = tokens.shape[0]

    def should_move(self, live: int) -> bool:
        return live < self.slots  # finished rows leave the batch: they cost no more compute

    def move(self, live: list[int]) -> int:
        idx = torch.tensor(live, dtype=torch.int64, device=self.tokens.device)
        for runner in self.runners:
            runner.select(idx)
        self.state.select(idx, live)
        self.tokens = self.tokens[idx]
        self.slots = len(live)
        return self.slots

    def launch(self) -> Optional[Chunk]:
        logits = [runner.step(self.tokens) for runner in self.runners]
        self.tokens, logprobs = self.state.sample(logits, vocab_size=self.vocab_size, backend=self.backend,
                                                  return_logprobs=self.return_logprobs, validate=False)  # fmt: skip
        self.state.step += 1
        tokens = self.tokens
        return lambda: ([tokens.tolist()], [logprobs.tolist()] if logprobs is not None else None)

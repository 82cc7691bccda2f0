"""The base-drafted block decoder: a served base drafts, the local small models verify (``docs/semantics.md``
section 8, "Blocks drafted by the base"; the math is :func:`proxytune.remote.blocks.verify_block`).

The decoder starts at the prompts: the first round's request draws each row's first tokens (no one-token
request first). One :meth:`BaseDraftDecoder.launch` is one round for every slot:

1. one request per row (concurrent): ``n_r`` tokens continuing the row, drawn by the server from the base
   itself (temperature 1, no filters, a seed derived from the row's; greedy rows draft greedily), with the
   top-k rows of their positions (:meth:`~proxytune.engine.remote_base.RemoteRunner.draft`);
2. the experts and anti-experts are fed ``[last token, d_1 .. d_{n-1}]`` in one forward each (``extend``):
   their logits at the positions that predict ``d_1 .. d_n`` (the first round: their prefill logits, then
   ``d_1 .. d_{n-1}``);
3. :func:`~proxytune.remote.blocks.verify_block` keeps the drafts the proxy-tuned target accepts and, at the
   first rejection, draws the residual (greedy rows: the target's argmax), so every token is distributed
   exactly as with one request per token;
4. the small models forget what no row kept (``rollback``), the base's runner is fed the kept tokens.

A row gets between 1 and ``n_r`` tokens per request. ``n_r`` is the member's ``block`` (never past the row's
budget), or with ``block="adaptive"`` follows the row's own acceptance
(:func:`~proxytune.remote.blocks.next_block_size`, from 4 up to 16). Host syncs: the round's ids go over HTTP.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from proxytune.engine.eager_decoder import EagerDecoder
from proxytune.engine.loop import Chunk
from proxytune.engine.remote_base import FIRST_BLOCK, MAX_BLOCK, RemoteRunner
from proxytune.engine.runner import ModelRunner, to_device
from proxytune.engine.sampler_state import SamplerState
from proxytune.remote.blocks import next_block_size, server_draft_seed, verify_block

__all__ = ["BaseDraftDecoder"]


class BaseDraftDecoder(EagerDecoder):
    """Rounds of base-drafted blocks from the prompt on: the base's runner a
    :class:`~proxytune.engine.remote_base.RemoteRunner` holding the prompts (:meth:`~proxytune.engine.remote_base.
    RemoteRunner.start`), the experts' and anti-experts' runners prefilled.

    Parameters
    ----------
    runners : the base's, the experts', then the anti-experts' runners
    state : the rows' sampler state (``step`` 0: no token drawn yet)
    first : the experts' then the anti-experts' prefill logits ``[B, W]`` (the positions that predict each row's
        first token)
    budgets : tokens each row may draw (at least 1)
    block : drafts per request (an integer >= 1) or ``"adaptive"``
    vocab_size, backend, return_logprobs : as for the eager decoder (the target is the op's, in the reference
        arithmetic of :func:`~proxytune.remote.blocks.verify_block`)
    """

    pipelined = False

    def __init__(self, runners: Sequence[Union[RemoteRunner, ModelRunner]], state: SamplerState,
                 first: Sequence[torch.Tensor], *, budgets: Sequence[int], block: Union[int, str], vocab_size: int,
                 backend: str, return_logprobs: bool):  # fmt: skip
        if not isinstance(runners[0], RemoteRunner):
            raise TypeError("base-drafted blocks need a served base (RemoteModel)")
        self.runners, self.state, self.tokens = list(runners), state, None  # no last token before the first round
        self.vocab_size, self.backend, self.return_logprobs = vocab_size, backend, return_logprobs
        self.slots = len(budgets)
        self.first: Optional[list[torch.Tensor]] = [to_device(x, state.step.device) for x in first]
        self.adaptive = block == "adaptive"
        self.max_size = MAX_BLOCK if self.adaptive else int(block)
        self.size = [FIRST_BLOCK if self.adaptive else int(block)] * self.slots
        self.remaining = list(budgets)
        self.requests = self.drafted = self.accepted = self.tokens_out = 0  # totals over slots, for measurements

    def move(self, live: list[int]) -> int:
        idx = torch.tensor(live, dtype=torch.int64, device=self.state.step.device)
        for runner in self.runners:
            runner.select(idx)
        self.state.select(idx, live)
        if self.tokens is not None:
            self.tokens = self.tokens[idx]
        if self.first is not None:
            self.first = [x[idx] for x in self.first]
        self.remaining = [self.remaining[j] for j in live]
        self.size = [self.size[j] for j in live]
        self.slots = len(live)
        return self.slots

    def _small_logits(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], int]:
        """The small models' logits ``[B, n, W]`` at the positions that predict ``d_1 .. d_n``, and how many
        tokens each was fed: ``[last, d_1 .. d_{n-1}]`` in one forward, or in the first round the prefill's
        logits and ``[d_1 .. d_{n-1}]``."""
        dev, n = self.state.step.device, ids.shape[1]
        # A draft outside the common vocabulary (a wider served one) is always rejected (target probability 0)
        # and the positions after it are never read, but the small models cannot be fed it: id 0 stands in.
        ids = ids.masked_fill(ids >= self.vocab_size, 0)
        if self.first is None:
            fed = torch.cat([self.tokens[:, None], ids[:, : n - 1]], dim=1)
            return [to_device(r.extend(fed), dev) for r in self.runners[1:]], n
        first, self.first = self.first, None
        if n == 1:
            return [x[:, None] for x in first], 0
        rest = [to_device(r.extend(ids[:, : n - 1]), dev) for r in self.runners[1:]]
        return [torch.cat([x[:, None], y], dim=1) for x, y in zip(first, rest)], n - 1

    def launch(self) -> Optional[Chunk]:
        """One draft-and-verify round for every slot (the four phases of the module docstring)."""
        if max(self.remaining) <= 0:
            return None
        st, dev = self.state, self.state.step.device
        base: RemoteRunner = self.runners[0]  # type: ignore[assignment]
        sizes = [max(1, min(s, r)) for s, r in zip(self.size, self.remaining)]
        sampled = st.sampled if st.sampled is not None else tuple((st.temperature > 0).tolist())
        seeds = [server_draft_seed(s, t) for s, t in zip(st.seed.tolist(), st.step.tolist())]
        pending = self.tokens is not None  # the last drawn token, fed to no model yet
        if pending:
            base.append([[t] for t in self.tokens.tolist()])
        ids, lengths, rows = base.draft(sizes, sampled, seeds)
        ids, lengths, rows = to_device(ids, dev), to_device(lengths, dev), to_device(rows, dev)
        small, fed = self._small_logits(ids)
        p = st.weights.shape[0]
        verdict = verify_block(ids, rows, small[:p], small[p:], st.weights, temperature=st.temperature,
                               top_k=st.top_k, top_p=st.top_p, min_p=st.min_p, seed=st.seed, step=st.step,
                               lengths=lengths)  # fmt: skip
        new = verdict.tokens(ids)  # the round's host sync
        accepted, got = verdict.accepted.tolist(), lengths.tolist()
        if fed:  # the small models keep the pending token and the drafts before the new last token
            kept = torch.tensor([min(a, g - 1) + pending for a, g in zip(accepted, got)], dtype=torch.int64, device=dev)
            for runner in self.runners[1:]:
                runner.rollback(fed, kept)
        base.append([t[:-1] for t in new])
        self.tokens = torch.tensor([t[-1] for t in new], dtype=torch.int64, device=dev)
        st.step += torch.tensor([len(t) for t in new], dtype=torch.int64, device=dev)
        self.requests += self.slots
        self.drafted += sum(got)
        self.accepted += sum(accepted)
        self.tokens_out += sum(len(t) for t in new)
        for j, (t, a, g) in enumerate(zip(new, accepted, got)):
            self.remaining[j] -= len(t)
            if self.adaptive:
                self.size[j] = next_block_size(g, a, self.max_size, max(1, self.remaining[j]))
        lps = verdict.logprobs.tolist() if self.return_logprobs else None
        width = max(len(t) for t in new)
        tokens = [[t[i] if i < len(t) else None for t in new] for i in range(width)]
        logprobs = [[lp[i] if i < len(t) else None for t, lp in zip(new, lps)] for i in range(width)] if lps else None
        return lambda: (tokens, logprobs)

"""The base-drafted block decoder: a served base drafts, the local small models verify (``docs/semantics.md``
section 8, "Blocks drafted by the base"; the math is :func:`proxytune.remote.blocks.verify_block`).

One :meth:`BaseDraftDecoder.launch` is one round for every slot:

1. one request per row (concurrent): ``n_r`` tokens continuing the row, drawn by the server from the base
   itself (temperature 1, no filters, a seed derived from the row's; greedy rows draft greedily), with the
   top-k rows of their positions (:meth:`~proxytune.engine.remote_base.RemoteRunner.draft`);
2. the experts and anti-experts are fed ``[last token, d_1 .. d_{n-1}]`` in one forward each (``extend``):
   their logits at the positions that predict ``d_1 .. d_n``;
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
    """Rounds of base-drafted blocks over prefilled runners: the base's a
    :class:`~proxytune.engine.remote_base.RemoteRunner`, then the experts' and anti-experts'.

    Parameters
    ----------
    runners : the base's, the experts', then the anti-experts' runners, prefilled
    state : the rows' sampler state (``step`` already counts the first token)
    tokens : the first drawn token of each row ``[B]`` int64 on the sampler's device
    budgets : tokens each row may still draw (its budget minus the first token)
    block : drafts per request (an integer >= 1) or ``"adaptive"``
    vocab_size, backend, return_logprobs : as for the eager decoder (the target is the op's, in the reference
        arithmetic of :func:`~proxytune.remote.blocks.verify_block`)
    """

    pipelined = False

    def __init__(self, runners: Sequence[Union[RemoteRunner, ModelRunner]], state: SamplerState, tokens: torch.Tensor, *,
                 budgets: Sequence[int], block: Union[int, str], vocab_size: int, backend: str,
                 return_logprobs: bool):  # fmt: skip
        if not isinstance(runners[0], RemoteRunner):
            raise TypeError("base-drafted blocks need a served base (RemoteModel)")
        super().__init__(runners, state, tokens, vocab_size=vocab_size, backend=backend, return_logprobs=return_logprobs)
        self.adaptive = block == "adaptive"
        self.max_size = MAX_BLOCK if self.adaptive else int(block)
        self.size = [FIRST_BLOCK if self.adaptive else int(block)] * self.slots
        self.remaining = list(budgets)
        self.requests = self.drafted = self.accepted = self.tokens_out = 0  # totals over slots, for measurements

    def move(self, live: list[int]) -> int:
        super().move(live)
        self.remaining = [self.remaining[j] for j in live]
        self.size = [self.size[j] for j in live]
        return self.slots

    def launch(self) -> Optional[Chunk]:
        """One draft-and-verify round for every slot (the four phases of the module docstring)."""
        if max(self.remaining) <= 0:
            return None
        st, dev = self.state, self.state.step.device
        base: RemoteRunner = self.runners[0]  # type: ignore[assignment]
        sizes = [max(1, min(s, r)) for s, r in zip(self.size, self.remaining)]
        sampled = st.sampled if st.sampled is not None else tuple((st.temperature > 0).tolist())
        seeds = [server_draft_seed(s, t) for s, t in zip(st.seed.tolist(), st.step.tolist())]
        base.append([[t] for t in self.tokens.tolist()])
        ids, lengths, rows = base.draft(sizes, sampled, seeds)
        ids, lengths, rows = to_device(ids, dev), to_device(lengths, dev), to_device(rows, dev)
        n = ids.shape[1]
        fed = torch.cat([self.tokens[:, None], ids[:, : n - 1]], dim=1)  # position i predicts d_{i+1}
        small = [to_device(r.extend(fed), dev) for r in self.runners[1:]]
        p = st.weights.shape[0]
        verdict = verify_block(ids, rows, small[:p], small[p:], st.weights, temperature=st.temperature,
                               top_k=st.top_k, top_p=st.top_p, min_p=st.min_p, seed=st.seed, step=st.step,
                               lengths=lengths)  # fmt: skip
        new = verdict.tokens(ids)  # the round's host sync
        accepted, got = verdict.accepted.tolist(), lengths.tolist()
        kept = [a + 1 if a < g else a for a, g in zip(accepted, got)]  # the last token, then the kept drafts but the last
        kept_t = torch.tensor(kept, dtype=torch.int64, device=dev)
        for runner in self.runners[1:]:
            runner.rollback(n, kept_t)
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

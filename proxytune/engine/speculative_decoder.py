"""The speculative decoder: the first expert drafts, the base and the other models verify a block in one forward.

One :meth:`SpeculativeDecoder.launch` is one round for every slot (the math is :mod:`proxytune.speculative`,
the rule and its noise streams ``docs/speculative.md``):

1. the expert (pair 0's) is fed the row's last token and drafts ``K`` tokens one forward at a time, from its
   own distribution with the request's temperature and filters (``K`` one-token forwards; one more, for its
   logits after the last draft, only when a row accepts all ``K``);
2. the base, the other experts and every anti-expert are fed ``[last token, d_1 .. d_K]`` in **one** forward
   each (:meth:`~proxytune.engine.runner.ModelRunner.extend`), giving ``K + 1`` positions of logits;
3. the combined, filtered target is computed per position (``proxytune.combine`` with the tuner's backend,
   then the op's filters); drafts are accepted while ``u < p / q``; the first rejected position draws from the
   residual ``max(0, p - q)``, and a row that accepts all its drafts draws a bonus token from the target by
   the op itself (greedy rows: the target's argmax in both cases, so greedy ids are the plain engine's);
4. every model forgets the tokens past the row's accepted ones (:meth:`~proxytune.engine.runner.ModelRunner.rollback`:
   holes in the attention mask, positions moved back, the common tail cropped from each ``DynamicCache``).

Rows accept different numbers of tokens: the chunk is ragged (``None`` past a slot's tokens, see
:mod:`proxytune.engine.loop`). ``K`` is the largest draft length of the live rows; each row uses its own
(``k_r``, at most its remaining budget minus one, so no row draws past ``max_new_tokens``), and with
``adaptive`` its ``k_r`` follows its own acceptance: all ``k_r`` drafts accepted -> ``k_r + 2``, else
``k_r - 1`` (between 1 and ``draft_tokens``; Hugging Face's "heuristic" schedule). A row's tokens therefore
depend on its own seed, prompt and history only, never on its batch. One host sync per round (the accepted
counts), plus one where a sampled row was rejected (the residual); none for the acceptance noise (whether any
row samples is known on the host, from the requests).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from proxytune.engine.runner import ModelRunner, to_device
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.eager_decoder import EagerDecoder
from proxytune.engine.ensemble import split_roles
from proxytune.engine.loop import Chunk
from proxytune.noise import stream_seed
from proxytune.ops import combine, sample as proxy_sample
from proxytune.speculative import ACCEPT_STREAM, DRAFT_STREAM, RESIDUAL_STREAM, accept_drafts, accept_greedy, \
    accepted_counts, draft_tokens, filtered_logprobs, residual_logits  # fmt: skip

__all__ = ["SpeculativeDecoder"]


class SpeculativeDecoder(EagerDecoder):
    """Speculative rounds over prefilled :class:`~proxytune.engine.runner.ModelRunner` s (at least one pair).

    Parameters
    ----------
    runners : the base's, the experts', then the anti-experts' runners, prefilled (the first expert drafts)
    state : the rows' sampler state (``step`` already counts the first token)
    tokens : the first drawn token of each row ``[B]`` int64 on the sampler's device
    budgets : tokens each row may still draw (its budget minus the first token)
    draft_tokens : the most drafts per round (``k``, >= 1)
    adaptive : adapt each row's draft length to its acceptance (else always ``draft_tokens``)
    vocab_size, backend, return_logprobs : as for ``proxytune.sample``
    """

    pipelined = False

    def __init__(self, runners: Sequence[ModelRunner], state: SamplerState, tokens: torch.Tensor, *,
                 budgets: Sequence[int], draft_tokens: int, adaptive: bool, vocab_size: int, backend: str,
                 return_logprobs: bool):  # fmt: skip
        if len(runners) < 3:
            raise ValueError("speculative decoding needs an (expert, anti-expert) pair: the first expert drafts")
        super().__init__(runners, state, tokens, vocab_size=vocab_size, backend=backend, return_logprobs=return_logprobs)
        self.n_pairs = state.weights.shape[0]
        self.k_max, self.adaptive = draft_tokens, adaptive
        self.remaining = list(budgets)
        self.k = [draft_tokens] * self.slots
        self.rounds = self.drafted = self.accepted = 0  # totals over slots, for measurements
        self.stream_seeds = torch.stack([stream_seed(state.seed, c) for c in (DRAFT_STREAM, ACCEPT_STREAM, RESIDUAL_STREAM)])

    @property
    def any_sampled(self) -> bool:
        """Whether some live row samples (else no accept noise is needed): host-known, from the requests."""
        return self.state.any_sampled

    def move(self, live: list[int]) -> int:
        super().move(live)  # runners, sampler state, last tokens
        idx = torch.tensor(live, dtype=torch.int64, device=self.stream_seeds.device)
        self.stream_seeds = self.stream_seeds[:, idx]
        self.remaining = [self.remaining[j] for j in live]
        self.k = [self.k[j] for j in live]
        return self.slots

    def launch(self) -> Optional[Chunk]:
        """One round for every slot, in the four phases of the module docstring."""
        if max(self.remaining) <= 0:
            return None
        limits = [max(0, min(k, rem - 1)) for k, rem in zip(self.k, self.remaining)]  # drafts per row this round
        k = max(limits)
        drafts, logq, expert_logits = self._draft(k)
        block = torch.stack([self.tokens, *drafts], dim=1)  # [B, k + 1]
        scored = [to_device(r.extend(block), self.state.step.device) for r in self._verifiers()]
        n, s, logp, lp, expert_fed = self._accept(k, limits, drafts, logq, expert_logits, scored, block)
        x, x_lp = self._correct(n, limits, s, logp, expert_logits)
        for runner in self.runners:  # every model forgets what no row kept
            runner.rollback(expert_fed if runner is self.runners[1] else k + 1, n + 1)
        self.state.step += n + 1
        self.tokens = x
        d = torch.stack(drafts, dim=1) if drafts else block[:, :0]
        return self._finish(limits, n, d, lp, x, x_lp)

    # ------------------------------------------------------------------------------------------ the phases

    def _verifiers(self) -> list[ModelRunner]:
        """The base, the other experts and the anti-experts (every runner but the drafting expert's)."""
        return [self.runners[0], *self.runners[2:]]

    def _draft(self, k: int) -> tuple[list, list, list]:
        """Phase 1: ``k`` one-token forwards of the expert (fed the last token, then each draft but the last),
        each draft drawn from its own filtered distribution. ``(drafts [B] x k, log q [B] x k, the expert's
        logits [B, W] x k)``."""
        st, dev = self.state, self.state.step.device
        draft_seed = self.stream_seeds[0]
        drafts, logq, expert_logits, last = [], [], [], self.tokens
        for i in range(k):
            e = to_device(self.runners[1].extend(last[:, None])[:, 0], dev)
            expert_logits.append(e)
            last, lq = draft_tokens(e, temperature=st.temperature, top_k=st.top_k, top_p=st.top_p, min_p=st.min_p,
                                    draft_seed=draft_seed, step=st.step + i, vocab_size=self.vocab_size,
                                    backend=self.backend, filters_used=st.filters_used)  # fmt: skip
            drafts.append(last)
            logq.append(lq)
        return drafts, logq, expert_logits

    def _target(self, scored: list, first: int, stop: int, expert_at: list) -> tuple[torch.Tensor, torch.Tensor]:
        """The combined logits ``[B, n, V]`` at block positions ``[first, stop)`` and their filtered
        log-probabilities (the op's final distribution, :func:`~proxytune.speculative.filtered_logprobs`)."""
        st, b, v, n_pos = self.state, self.slots, self.vocab_size, stop - first
        base, experts, anti_experts = split_roles([x[:, first:stop] for x in scored[:1]] + [torch.stack(expert_at, dim=1)]
                                                  + [x[:, first:stop] for x in scored[1:]], self.n_pairs)  # fmt: skip
        flat = lambda x: x.reshape(b * n_pos, x.shape[-1])  # noqa: E731
        w = st.weights.repeat_interleave(n_pos, dim=1)
        s = combine(flat(base), [flat(x) for x in experts], [flat(x) for x in anti_experts], weights=w, vocab_size=v,
                    backend=self.backend, validate=False)  # fmt: skip
        rep = lambda x: x.repeat_interleave(n_pos)  # noqa: E731  per-row values per position
        logp = filtered_logprobs(s, rep(st.temperature), rep(st.top_k), rep(st.top_p), rep(st.min_p),
                                 filtered=st.filters_used != frozenset())  # fmt: skip
        return s.view(b, n_pos, v), logp.view(b, n_pos, v)

    def _accept(self, k, limits, drafts, logq, expert_logits, scored, block):
        """Phase 3a: the target at the drafts' positions and the accept test; ``(accepted counts n [B], the
        target's logits and log-probabilities at positions [0, k] (k + 1 only where some row accepted all k),
        log p of the drafts [B, k], how many tokens the expert was fed)``."""
        st, dev, b = self.state, self.state.step.device, self.slots
        limit = torch.tensor(limits, dtype=torch.int64, device=dev)
        if k > 0:
            s, logp = self._target(scored, 0, k, expert_logits)
            lp = logp.gather(2, torch.stack(drafts, dim=1)[..., None])[..., 0]
            lq = torch.stack(logq, dim=1)
            accepted = accept_drafts(lp, lq, self.stream_seeds[1], st.step) if self.any_sampled else accept_greedy(lp, lq)
            n = accepted_counts(accepted, limit)
        else:
            s = logp = scored[0][:, :0, : self.vocab_size].float()
            lp, n = logp[:, :, 0], torch.zeros(b, dtype=torch.int64, device=dev)
        expert_fed = k
        if bool((n == k).any()):  # a row accepted all k drafts: the bonus needs the expert's logits after d_k
            expert_logits.append(to_device(self.runners[1].extend(block[:, -1:])[:, 0], dev))
            expert_fed += 1
            s_last, logp_last = self._target(scored, k, k + 1, expert_logits[k:])
            s, logp = torch.cat([s, s_last], dim=1), torch.cat([logp, logp_last], dim=1)
        return n, s, logp, lp, expert_fed

    def _correct(self, n, limits, s, logp, expert_logits) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 3b: the token after each row's accepted drafts: from the residual ``max(0, p - q)`` where a
        sampled row rejected a draft, else from the target by the op itself (the bonus token; greedy rows: the
        argmax). ``(tokens [B], log p of them [B])``."""
        st, b, v = self.state, self.slots, self.vocab_size
        rows = torch.arange(b, device=st.step.device)
        limit = torch.tensor(limits, dtype=torch.int64, device=st.step.device)
        resid = (n < limit) & (st.temperature > 0)  # sampled rows that rejected a draft
        at = s[rows, n]  # the combined logits at each row's correction position
        temperature, top_k, top_p, min_p, seed = st.temperature, st.top_k, st.top_p, st.min_p, st.seed
        if self.any_sampled and bool(resid.any()):
            e_at = torch.stack(expert_logits, dim=1)[rows, n, :v].float()
            q = filtered_logprobs(e_at, st.temperature, st.top_k, st.top_p, st.min_p,
                                  filtered=st.filters_used != frozenset())  # fmt: skip
            at = torch.where(resid[:, None], residual_logits(logp[rows, n], q), at)
            temperature = torch.where(resid, 1.0, temperature)
            top_k, top_p, min_p = torch.where(resid, 0, top_k), torch.where(resid, 1.0, top_p), torch.where(resid, 0.0, min_p)
            seed = torch.where(resid, self.stream_seeds[2], seed)
        x = proxy_sample(at, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=st.step + n,
                         vocab_size=v, backend=self.backend, validate=False, filters_used=st.filters_used)  # fmt: skip
        return x, logp[rows, n].gather(1, x[:, None])[:, 0]

    def _finish(self, limits, n, d, lp, x, x_lp) -> Chunk:
        """Phase 4: the round's bookkeeping (budgets, adaptive draft lengths, totals) and its ragged chunk."""
        counts = n.tolist()  # the round's one host sync
        ids = torch.cat([d, x[:, None]], dim=1).tolist()
        lps = torch.cat([lp, x_lp[:, None]], dim=1).tolist() if self.return_logprobs else None
        self.rounds += self.slots
        self.drafted += sum(limits)
        self.accepted += sum(counts)
        for j, c in enumerate(counts):
            self.remaining[j] -= c + 1
            if self.adaptive:
                self.k[j] = min(self.k_max, self.k[j] + 2) if c == limits[j] else max(1, self.k[j] - 1)
        width = max(counts) + 1

        def ragged(values):
            return [[values[j][t] if t < c else values[j][-1] if t == c else None for j, c in enumerate(counts)]
                    for t in range(width)]  # fmt: skip

        tokens, logprobs = ragged(ids), ragged(lps) if lps is not None else None
        return lambda: (tokens, logprobs)

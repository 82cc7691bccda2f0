"""The speculative decoder: the first expert drafts, the base and the other models verify a block in one forward.

One :meth:`SpeculativeDecoder.launch` is one round for every slot (the math is :mod:`proxytune.speculative`,
the rule and its noise streams ``docs/speculative.md``):

1. the expert (pair 0's) is fed the row's last token and drafts ``K`` tokens one forward at a time, from its
   own distribution with the request's temperature and filters (``K`` one-token forwards; one more, for its
   logits after the last draft, only when a row accepts all ``K``);
2. the base, the other experts and every anti-expert are fed ``[last token, d_1 .. d_K]`` in **one** forward
   each (:meth:`~proxytune.engine.decode.ModelRunner.extend`), giving ``K + 1`` positions of logits;
3. the combined, filtered target is computed per position (``proxytune.combine`` with the tuner's backend,
   then the op's filters); drafts are accepted while ``u < p / q``; the first rejected position draws from the
   residual ``max(0, p - q)``, and a row that accepts all its drafts draws a bonus token from the target by
   the op itself (greedy rows: the target's argmax in both cases, so greedy ids are the plain engine's);
4. every model forgets the tokens past the row's accepted ones (:meth:`~proxytune.engine.decode.ModelRunner.rollback`:
   holes in the attention mask, positions moved back, the common tail cropped from each ``DynamicCache``).

Rows accept different numbers of tokens: the chunk is ragged (``None`` past a slot's tokens, see
:mod:`proxytune.engine.loop`). ``K`` is the largest draft length of the live rows; each row uses its own
(``k_r``, at most its remaining budget minus one, so no row draws past ``max_new_tokens``), and with
``adaptive`` its ``k_r`` follows its own acceptance: all ``k_r`` drafts accepted -> ``k_r + 2``, else
``k_r - 1`` (between 1 and ``draft_tokens``; Hugging Face's "heuristic" schedule). A row's tokens therefore
depend on its own seed, prompt and history only, never on its batch. One host sync per round (the accepted
counts), plus one where a sampled row was rejected (the residual).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from proxytune.engine.decode import ModelRunner, SamplerState, to_device
from proxytune.engine.eager_decoder import EagerDecoder
from proxytune.engine.loop import Chunk
from proxytune.noise import stream_seed
from proxytune.ops import combine, sample as proxy_sample
from proxytune.speculative import ACCEPT_STREAM, DRAFT_STREAM, RESIDUAL_STREAM, accept_drafts, accept_greedy, \
    accepted_counts, draft_tokens, filtered_logprobs, residual_logits  # fmt: skip

__all__ = ["SpeculativeDecoder"]


class SpeculativeDecoder(EagerDecoder):
    """Speculative rounds over prefilled :class:`~proxytune.engine.decode.ModelRunner` s (at least one pair).

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
        self.any_sampled = bool((state.temperature > 0).any())  # else no accept noise is needed

    def move(self, live: list[int]) -> int:
        super().move(live)  # runners, sampler state, last tokens
        idx = torch.tensor(live, dtype=torch.int64, device=self.stream_seeds.device)
        self.stream_seeds = self.stream_seeds[:, idx]
        self.any_sampled = bool((self.state.temperature > 0).any())
        self.remaining = [self.remaining[j] for j in live]
        self.k = [self.k[j] for j in live]
        return self.slots

    def launch(self) -> Optional[Chunk]:
        if max(self.remaining) <= 0:
            return None
        st, b, v = self.state, self.slots, self.vocab_size
        dev = st.step.device
        draft_seed, accept_seed, residual_seed = self.stream_seeds
        limits = [max(0, min(k, rem - 1)) for k, rem in zip(self.k, self.remaining)]
        k = max(limits)
        expert, verifiers = self.runners[1], [self.runners[0]] + self.runners[2:]

        # 1. drafts: k one-token forwards of the expert (fed the last token, then each draft but the last)
        drafts, logq, expert_logits, last = [], [], [], self.tokens
        for i in range(k):
            e = to_device(expert.extend(last[:, None])[:, 0], dev)
            expert_logits.append(e)
            last, lq = draft_tokens(e, temperature=st.temperature, top_k=st.top_k, top_p=st.top_p, min_p=st.min_p,
                                    draft_seed=draft_seed, step=st.step + i, vocab_size=v, backend=self.backend)  # fmt: skip
            drafts.append(last)
            logq.append(lq)
        block = torch.stack([self.tokens] + drafts, dim=1)  # [B, k + 1]

        # 2. one forward of k + 1 tokens for the base and every other model
        scored = [to_device(r.extend(block), dev) for r in verifiers]

        # 3. the target per position, the accept test, the correction (residual or bonus) token
        def target(first: int, stop: int, expert_at: list) -> torch.Tensor:
            """The combined logits at positions [first, stop) of the block ``[B, stop - first, V]``."""
            n_pos = stop - first
            logits = [scored[0][:, first:stop], torch.stack(expert_at, dim=1)] + [x[:, first:stop] for x in scored[1:]]
            flat = [x.reshape(b * n_pos, x.shape[-1]) for x in logits]  # base, experts, anti-experts
            w = st.weights.repeat_interleave(n_pos, dim=1)
            return combine(flat[0], flat[1 : 1 + self.n_pairs], flat[1 + self.n_pairs :], weights=w, vocab_size=v,
                           backend=self.backend, validate=False).view(b, n_pos, v)  # fmt: skip

        def logprobs_of(s: torch.Tensor) -> torch.Tensor:
            n_pos = s.shape[1]
            rep = lambda x: x.repeat_interleave(n_pos)  # noqa: E731  per-row values per position
            return filtered_logprobs(s.reshape(b * n_pos, v), rep(st.temperature), rep(st.top_k), rep(st.top_p),
                                     rep(st.min_p)).view(b, n_pos, v)  # fmt: skip

        limit = torch.tensor(limits, dtype=torch.int64, device=dev)
        rows = torch.arange(b, device=dev)
        if k > 0:
            s = target(0, k, expert_logits)
            logp = logprobs_of(s)
            d = torch.stack(drafts, dim=1)  # [B, k]
            lp = logp.gather(2, d[..., None])[..., 0]
            lq = torch.stack(logq, dim=1)
            accepted = accept_drafts(lp, lq, accept_seed, st.step) if self.any_sampled else accept_greedy(lp, lq)
            n = accepted_counts(accepted, limit)
        else:
            s = logp = scored[0][:, :0, :v].float()
            d, lp, n = block[:, :0], logp[:, :, 0], torch.zeros(b, dtype=torch.int64, device=dev)
        expert_fed = k
        if bool((n == k).any()):  # a row accepted all k drafts: the bonus needs the expert's logits after d_k
            expert_logits.append(to_device(expert.extend(block[:, -1:])[:, 0], dev))
            expert_fed += 1
            s_last = target(k, k + 1, expert_logits[k:])
            s, logp = torch.cat([s, s_last], dim=1), torch.cat([logp, logprobs_of(s_last)], dim=1)
        resid = (n < limit) & (st.temperature > 0)  # sampled rows that rejected a draft
        at = s[rows, n]  # the combined logits at each row's correction position
        temperature, top_k, top_p, min_p, seed = st.temperature, st.top_k, st.top_p, st.min_p, st.seed
        if bool(resid.any()):
            e_at = torch.stack(expert_logits, dim=1)[rows, n, :v].float()
            q = filtered_logprobs(e_at, st.temperature, st.top_k, st.top_p, st.min_p)
            at = torch.where(resid[:, None], residual_logits(logp[rows, n], q), at)
            temperature = torch.where(resid, 1.0, temperature)
            top_k, top_p, min_p = torch.where(resid, 0, top_k), torch.where(resid, 1.0, top_p), torch.where(resid, 0.0, min_p)
            seed = torch.where(resid, residual_seed, seed)
        x = proxy_sample(at, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=st.step + n,
                         vocab_size=v, backend=self.backend, validate=False)  # fmt: skip
        x_lp = logp[rows, n].gather(1, x[:, None])[:, 0]

        # 4. every model forgets what no row kept; the rows' state advances
        for runner in self.runners:
            runner.rollback(expert_fed if runner is expert else k + 1, n + 1)
        st.step += n + 1
        self.tokens = x
        counts = n.tolist()
        ids = torch.cat([d, x[:, None]], dim=1).tolist()
        lps = torch.cat([lp, x_lp[:, None]], dim=1).tolist() if self.return_logprobs else None
        self.rounds += b
        self.drafted += sum(limits)
        self.accepted += sum(counts)
        for j, c in enumerate(counts):
            self.remaining[j] -= c + 1
            if self.adaptive:
                self.k[j] = min(self.k_max, self.k[j] + 2) if c == limits[j] else max(1, self.k[j] - 1)
        width = max(counts) + 1
        tokens = [[ids[j][t] if t < c else ids[j][-1] if t == c else None for j, c in enumerate(counts)]
                  for t in range(width)]  # fmt: skip
        logprobs = None
        if lps is not None:
            logprobs = [[lps[j][t] if t < c else lps[j][-1] if t == c else None for j, c in enumerate(counts)]
                        for t in range(width)]  # fmt: skip
        return lambda: (tokens, logprobs)

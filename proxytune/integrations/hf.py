"""Proxy-tuning inside Hugging Face ``generate``: a ``LogitsProcessor`` that adds the small models' steer.

    from transformers import LogitsProcessorList
    from proxytune.integrations.hf import ProxyTuningLogitsProcessor

    p = ProxyTuningLogitsProcessor(expert, anti_expert, weights=1.0, attention_mask=enc.attention_mask)
    out = base.generate(**enc, logits_processor=LogitsProcessorList([p]), do_sample=False, max_new_tokens=32)

At every step the processor runs each expert and anti-expert on the tokens ``input_ids`` gained since its
last call, with its own KV cache, and returns ``log_softmax(scores + sum_i w_i * (expert_i - anti_i))`` over
the common vocabulary ``V`` (``-inf`` past it). That is ``scores + sum_i w_i (expert_i - anti_i)`` up to one
constant per row: greedy search and sampling see exactly that distribution, and beam search (which hands
processors the base's log-probabilities) ranks hypotheses by their proxy-tuned log-probability.

What differs from :class:`proxytune.ProxyTuner`:

- Hugging Face does the decoding: its processors that come before custom ones (repetition penalty, bad
  words, min-length and other suppressions) act on the *base's* scores only, its warpers (temperature,
  top-k, top-p, min-p) act on the combined scores, and its sampler draws (``torch.multinomial``, seeded by
  ``torch.manual_seed``, not proxytune's counter-based noise: the same seed gives other tokens than
  ``ProxyTuner``). Greedy decoding gives ``ProxyTuner``'s tokens.
- No fused op and no static or graph step: the small models run eagerly, one after the other, and the
  combination is a few PyTorch ops. On the tiny family (64 prompts, 32 greedy tokens, one CPU thread, a busy
  machine) it took 2.1-3.8 s against ``ProxyTuner``'s 2.0-3.6 s for the same tokens; not measured on a GPU.
- Only models: no templates, no vocabulary check (the models must share the base's tokenizer) and no
  per-request weights.

Caches follow ``input_ids``: when the rows are the previous rows plus one token each, the small models step
once; when rows were reordered or duplicated (beam search) the caches are reindexed first; anything else (a
new batch, a longer jump) runs the small models over the whole ``input_ids`` again (``prefills`` counts those).
Padding: the processor never sees ``generate``'s attention mask, so give it ``attention_mask=`` (the prompt's,
``[B, L]``; beam search's ``B * num_beams`` rows are matched by repeating it), or ``pad_token_id=`` (leading
pad tokens of a row are padding). With neither, no row is padded, and a batch that looks left-padded is
refused (``ValueError``): some rows but not all start with a pad id of the small models' configs (their
``pad_token_id``, else their EOS, which ``generate`` pads with when there is no pad id).
Positions: each step checks that ``input_ids`` fits every small model's position limit (a ``ValueError``
naming the model, where the model itself would fail with an ``IndexError``). Models on the ``meta`` device
are refused when the processor is built. A processor given a mask refuses rows that do not
start with that mask's prompt: call :meth:`reset` with the new mask before reusing it for another batch.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Union

import torch
from transformers import LogitsProcessor

from proxytune._rules import check_weights
from proxytune.engine.ensemble import check_pairs, in_order, role_names, split_roles
from proxytune.engine.members import LocalModel
from proxytune.engine.requests import as_list
from proxytune.engine.runner import ModelRunner

__all__ = ["ProxyTuningLogitsProcessor"]


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """Add ``sum_i w_i * (expert_i - anti_expert_i)`` to the base's scores inside ``model.generate``.

    Parameters
    ----------
    experts, anti_experts : a ``PreTrainedModel`` or a sequence of them, pairwise (as in ``ProxyTuner``)
        Each runs on its own device; its logits are moved to the scores' device.
    weights : float or one float per pair (``alpha``), default 1.0
    attention_mask : ``[B, L]`` tensor, optional
        The prompt's attention mask as given to ``generate`` (left padding). See the module docstring.
    pad_token_id : int, optional
        Without ``attention_mask``: leading tokens equal to it are padding.
    vocab_size : int, optional
        Cap on the common vocabulary (default ``min(scores width, every small model's width)``).

    Returns (``__call__``) ``[R, W]`` float32 on the scores' device: ``log_softmax`` of the combined scores
    over the first ``V`` columns, ``-inf`` beyond.
    """

    def __init__(
        self,
        experts: Any,
        anti_experts: Any,
        weights: Union[float, Sequence[float]] = 1.0,
        *,
        attention_mask: Optional[torch.Tensor] = None,
        pad_token_id: Optional[int] = None,
        vocab_size: Optional[int] = None,
    ):
        experts, anti_experts = check_pairs(experts, anti_experts, at_least_one=True)
        self.weights = check_weights(weights, len(experts))
        # the ensemble's members without its base (generate runs the base): experts, then anti-experts
        names = role_names(len(experts))[1:]
        self.models = [LocalModel.adopt(m, n) for m, n in zip(in_order(None, experts, anti_experts)[1:], names)]
        if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral)):
            raise TypeError(f"pad_token_id must be an integer token id, got {pad_token_id!r}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size
        self.prefills = 0  # how many times the small models ran over whole sequences (a new batch, or rows lost)
        self.reset(attention_mask)

    def reset(self, attention_mask: Optional[torch.Tensor] = None) -> None:
        """Forget the caches (the next call runs the small models over its whole ``input_ids``) and take
        ``attention_mask`` as the next batch's prompt mask."""
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise ValueError("attention_mask must be a [B, L] tensor (the prompt's mask as given to generate)")
            attention_mask = attention_mask.detach().to("cpu", torch.long)
        self._prompt_mask = attention_mask
        self._prompt_rows: Optional[torch.Tensor] = None  # [B, L] the prompt the mask belongs to, seen at the first call
        self._runners: Optional[list[ModelRunner]] = None
        self._seen: Optional[torch.Tensor] = None  # [R, L] the ids the caches hold, on the CPU
        self._last: Optional[list[torch.Tensor]] = None

    def _mask_for(self, ids: torch.Tensor) -> torch.Tensor:
        """The attention mask of rows ``ids`` for a prefill: from the prompt mask (whose prompt these rows must
        start with; beam search's rows of one prompt are adjacent), else from leading pad tokens, else ones."""
        rows, length = ids.shape
        m = self._prompt_mask
        if m is not None:
            b, n = m.shape
            fits = rows % b == 0 and (length == n if self._prompt_rows is None else length >= n)
            if fits and self._prompt_rows is not None:
                fits = torch.equal(ids[:, :n], self._prompt_rows.repeat_interleave(rows // b, dim=0))
            if not fits:
                raise ValueError(
                    f"attention_mask is {tuple(m.shape)} but generate passed input_ids of {tuple(ids.shape)} that do not "
                    "start with the prompt it was given for; call reset(attention_mask=...) with this batch's mask"
                )
            if self._prompt_rows is None:
                self._prompt_rows = ids[::rows // b, :n].clone()
            m = m.repeat_interleave(rows // b, dim=0)
            return torch.cat([m, torch.ones((rows, length - n), dtype=torch.long)], dim=1)
        if self.pad_token_id is not None:
            return ((ids != self.pad_token_id).cumsum(-1) > 0).long()
        self._refuse_unseen_padding(ids)
        return torch.ones_like(ids)

    def _refuse_unseen_padding(self, ids: torch.Tensor) -> None:
        """Without ``attention_mask`` or ``pad_token_id`` the processor cannot tell padding from text: refuse a
        batch that looks padded (some rows, not all, start with a pad id the small models' configs name, or
        their EOS where they name no pad id, as ``generate`` then pads with it), rather than run the small
        models over the padding as if it were text."""
        if ids.shape[0] < 2:
            return
        pads = set()
        for m in self.models:
            for cfg in (getattr(m.module, "generation_config", None), m.module.config):
                pads.update(i for i in as_list(getattr(cfg, "pad_token_id", None)) if isinstance(i, int))
        if not pads:
            for m in self.models:
                for cfg in (getattr(m.module, "generation_config", None), m.module.config):
                    pads.update(i for i in as_list(getattr(cfg, "eos_token_id", None)) if isinstance(i, int))
        first = ids[:, 0].tolist()
        padded = [r for r, t in enumerate(first) if t in pads]
        if padded and len(padded) < len(first):
            raise ValueError(
                f"input_ids row {padded[0]} starts with token {first[padded[0]]}, a pad id of the small models, and "
                "other rows do not: a left-padded batch. Give the processor attention_mask= (the prompt's mask, as "
                "given to generate) or pad_token_id=, so that it does not read the padding as text"
            )

    def _check_positions(self, length: int) -> None:
        """Every small model must have room for ``length`` positions (as ``ProxyTuner`` checks prompts)."""
        for m in self.models:
            limit = m.position_limit
            if limit is not None and length > limit:
                raise ValueError(
                    f"input_ids has {length} positions but {m.name} takes at most {limit} "
                    "(max_position_embeddings / n_positions): shorten the prompt or max_new_tokens"
                )

    @torch.inference_mode()
    def _advance(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Each small model's next-token logits after ``input_ids`` (reusing and reindexing its cache)."""
        ids = input_ids.detach().to("cpu", torch.long)
        self._check_positions(ids.shape[1])
        seen = self._seen
        if seen is not None and ids.shape == seen.shape and torch.equal(ids, seen):
            return self._last  # called again for the same step
        if seen is not None and ids.shape[1] == seen.shape[1] + 1:
            prefix = ids[:, :-1]
            rows = None
            if prefix.shape[0] != seen.shape[0] or not torch.equal(prefix, seen):
                match = (prefix[:, None, :] == seen[None, :, :]).all(-1)  # [R, R_seen]
                rows = match.int().argmax(-1) if bool(match.any(-1).all()) else False
            if rows is not False:
                if rows is not None:
                    for runner in self._runners:
                        runner.select(rows)
                self._last = [runner.step(ids[:, -1]) for runner in self._runners]
                self._seen = ids
                return self._last
        mask = self._mask_for(ids)
        self._runners = [m.runner() for m in self.models]
        self._last = [r.prefill(ids.to(r.device), mask.to(r.device)) for r in self._runners]
        self._seen = ids
        self.prefills += 1
        return self._last

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = self._advance(input_ids)
        _, experts, anti_experts = split_roles([None, *logits], len(self.weights))
        v = min([scores.shape[-1], *(x.shape[-1] for x in logits)] + ([self.vocab_size] if self.vocab_size else []))
        with torch.no_grad():
            s = scores[:, :v].float()
            for w, e, a in zip(self.weights, experts, anti_experts):
                s = s + w * (e[:, :v].to(scores.device).float() - a[:, :v].to(scores.device).float())
            out = torch.full(scores.shape, -math.inf, dtype=torch.float32, device=scores.device)
            out[:, :v] = s.log_softmax(-1)
        return out

"""What a request is and what it gets back: :class:`SamplingParams`, :class:`TokenEvent`, :class:`Generation`,
and :class:`Row`, one request's state while it decodes (its ids, text and when it ends).

The parameter rules are the op's (:func:`proxytune._args.check_filter_scalars`), applied when a request is
accepted so that a bad one fails before any model runs, with the request named.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import AbstractSet, Any, Optional, Sequence, Union

from proxytune._args import check_filter_scalars, fresh_seed
from proxytune._rules import check_weights
from proxytune.engine.prompts import is_messages
from proxytune.engine.stopping import RowText

__all__ = ["Prompt", "SamplingParams", "Generation", "TokenEvent", "Row", "is_single", "as_list"]

Prompt = Union[str, Sequence[int], Sequence[dict]]  # a text, token ids, or a conversation of messages


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. Every field may differ between the prompts of a batch.

    ``temperature`` 0 is greedy. ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 are off. ``weights`` overrides the
    tuner's weight of each (expert, anti-expert) pair: one float for all pairs or one per pair. ``seed``
    (None: a fresh random one) and the row's token count drive counter-based noise, so a request draws the
    same tokens whatever else is in its batch. ``stop``: strings that end the text (cut before them); None or
    one string are accepted too. ``max_new_tokens`` may be as large as you like: a row also ends (finish
    reason ``"length"``) when prompt and new tokens fill the smallest position limit of the models
    (``max_position_embeddings`` / ``n_positions``); a prompt that already fills it is a ``ValueError``.
    Python numbers outside float32's range are refused; positive ones below its smallest value become it.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    weights: Union[None, float, Sequence[float]] = None
    seed: Optional[int] = None
    stop: Sequence[str] = ()

    def checked(self, n_pairs: int, where: str) -> "SamplingParams":
        """A copy ready for the sampler (stop strings as a tuple, numbers as the op takes them); raise
        ``ValueError`` naming a bad field, prefixed by ``where``."""

        def bad(name: str, rule: str):
            return ValueError(f"{where}: {name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, numbers.Integral) \
                or self.max_new_tokens < 0:  # fmt: skip
            raise bad("max_new_tokens", "an integer >= 0")
        for name, integer in (("temperature", False), ("top_k", True), ("top_p", False), ("min_p", False)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real):
                raise bad(name, "an integer" if integer else "a number")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
                                      or not -(2**63) <= self.seed < 2**63):  # fmt: skip
            raise bad("seed", "None or a 64-bit integer")
        weights = self.weights
        try:  # the one weight rule (proxytune._rules) and the op's own rules (fp32 ranges included), so a
            # request fails here and not mid-batch
            if weights is not None:
                weights = check_weights(weights, n_pairs)
            temperature, top_k, top_p, min_p, _ = check_filter_scalars(self.temperature, self.top_k, self.top_p,
                                                                       self.min_p, 1.0)  # fmt: skip
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from None
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise bad("stop", "a string or a sequence of non-empty strings") from None
        if not all(isinstance(s, str) and s for s in stop):
            raise bad("stop", "a string or a sequence of non-empty strings")
        return replace(self, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, weights=weights, stop=stop)


    @property
    def sampled(self) -> bool:
        """Whether the request draws at random (temperature > 0); a greedy one takes the argmax."""
        return self.temperature > 0

    def filters_used(self) -> frozenset:
        """The filters this request turns on, known on the host (``proxytune.sample``'s ``filters_used``): of
        ``top_k`` (> 0), ``top_p`` (< 1) and ``min_p`` (> 0); none for a greedy request, which no filter changes."""
        if not self.sampled:
            return frozenset()
        on = (("top_k", self.top_k > 0), ("top_p", self.top_p < 1), ("min_p", self.min_p > 0))
        return frozenset(name for name, used in on if used)


@dataclass
class Generation:
    """One prompt's result. ``token_ids`` include the EOS token when the row ended on it; ``text`` does not,
    and is cut before a stop string. ``finish_reason``: ``"eos"``, ``"stop"`` or ``"length"``."""

    prompt: Prompt
    text: str
    token_ids: list[int]
    finish_reason: str
    seed: int
    logprobs: Optional[list[float]] = None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of prompt ``index`` as :meth:`ProxyTuner.stream` yields it.

    ``text`` is the new final text (it may be empty while a multi-byte character or a possible stop string
    is pending); the texts of one prompt's events add up to its :class:`Generation` text. The last event of
    a prompt has a ``finish_reason``; a prompt with ``max_new_tokens=0`` gets one event with ``token_id`` None.
    """

    index: int
    token_id: Optional[int]
    text: str
    logprob: Optional[float] = None
    finish_reason: Optional[str] = None


@dataclass
class Row:
    """One request while it decodes: the ids and log-probabilities drawn so far, its text, its budget."""

    index: int
    prompt: Prompt
    params: SamplingParams
    seed: int
    text: RowText
    budget: int  # new tokens the row may draw: max_new_tokens, cut to the models' position limits
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @classmethod
    def start(cls, index: int, prompt: Prompt, params: SamplingParams, text: RowText, budget: int) -> "Row":
        """A row for a checked request; ``params.seed`` None draws a fresh seed (:func:`~proxytune._args.fresh_seed`)."""
        seed = params.seed if params.seed is not None else fresh_seed()
        return cls(index, prompt, params, seed, text, budget)

    def accept(self, token: int, logprob: Optional[float], eos_token_ids: AbstractSet[int]) -> TokenEvent:
        """Record ``token`` and decide whether the row ends on it (EOS, a stop string, or its budget)."""
        self.ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        reason = None
        if token in eos_token_ids:
            reason = "eos"
        elif self.text.add(token):
            reason = "stop"
        elif len(self.ids) >= self.budget:
            reason = "length"
        if reason is not None:
            self.text.flush()  # a stop string may sit in a character only now complete
            reason = "stop" if reason == "length" and self.text.stopped else reason
        return TokenEvent(self.index, token, self.text.take_stream(final=reason is not None), logprob, reason)


def is_single(prompts: Any) -> bool:
    """One prompt (a text, a list of token ids, a conversation) rather than a batch of them."""
    return isinstance(prompts, str) or is_messages(prompts) or (
        isinstance(prompts, (list, tuple)) and len(prompts) > 0 and isinstance(prompts[0], numbers.Integral)
    )  # fmt: skip


def as_list(x: Any) -> list:
    """``x`` as a list: None -> [], a list or tuple -> its items, anything else -> [x]."""
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]

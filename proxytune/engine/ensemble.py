"""The ensemble: the models in their roles, their shared tokenizer and vocabulary, position limits, templates
and pair weights, validated once (``docs/development.md``; DESIGN "The ensemble").

Every entry point builds it by :meth:`Ensemble.load` (``ProxyTuner``, lm-eval) or takes a built one, and
every rule about the models lives here, once:

* the model order: base, then the experts, then the anti-experts (:func:`in_order`, :func:`split_roles`;
  every list of per-model things in the engine, runners and logits included, is in this order);
* the pairs and their weights (:func:`check_pairs`, :func:`~proxytune._rules.check_weights`);
* the shared vocabulary (``min(len(tokenizer), every width)``, every member's tokenizer agreeing on it);
* each member's prompt ids (:meth:`Ensemble.prompt_ids`) and the position room they leave
  (:meth:`Ensemble.room`, :func:`common_position_limit`).

Members are :class:`~proxytune.engine.members.Member` s (:class:`~proxytune.engine.members.LocalModel`, a
served base :class:`~proxytune.engine.remote_base.RemoteModel`, LoRA pairs); a new kind of member is a new
member class, not a new path through the engine. Each member joins once the shared vocabulary is known
(:meth:`~proxytune.engine.members.Member.join`: a served base checks its server there).
"""

from __future__ import annotations

import numbers
import os
from typing import Any, Optional, Sequence, TypeVar, Union

import torch

from proxytune._rules import check_bool, check_weights
from proxytune.engine.members import LocalModel, Member
from proxytune.engine.requests import as_list
from proxytune.engine.prompts import chat_ids, check_messages, encode_prompt, is_messages, messages_text
from proxytune.engine.vocabulary import check_same_tokens, common_vocab_size

__all__ = ["Ensemble", "in_order", "split_roles", "role_names", "check_pairs", "common_position_limit"]

T = TypeVar("T")


def in_order(base: T, experts: Sequence[T], anti_experts: Sequence[T]) -> list[T]:
    """The one model order: ``[base, *experts, *anti_experts]``."""
    return [base, *experts, *anti_experts]


def split_roles(items: Sequence[T], n_pairs: Optional[int] = None) -> tuple[T, list[T], list[T]]:
    """``(base, experts, anti_experts)`` of a list in the model order (``n_pairs`` default: from its length)."""
    n = (len(items) - 1) // 2 if n_pairs is None else n_pairs
    if len(items) != 1 + 2 * n:
        raise ValueError(f"{len(items)} per-model items for a base and {n} pair(s)")
    return items[0], list(items[1 : 1 + n]), list(items[1 + n :])


def role_names(n_pairs: int) -> list[str]:
    """The members' names, in the model order: ``base``, ``expert 0`` ..., ``anti-expert 0`` ..."""
    return in_order("base", [f"expert {i}" for i in range(n_pairs)], [f"anti-expert {i}" for i in range(n_pairs)])


def check_pairs(experts: Any, anti_experts: Any, *, at_least_one: bool = False) -> tuple[list, list]:
    """The experts and anti-experts as lists of equal length (one model, a sequence, or None each)."""
    experts, anti_experts = as_list(experts), as_list(anti_experts)
    if len(experts) != len(anti_experts):
        raise ValueError(f"got {len(experts)} experts but {len(anti_experts)} anti-experts; they come in pairs")
    if at_least_one and not experts:
        raise ValueError("experts: give at least one (expert, anti-expert) pair")
    return experts, anti_experts


def common_position_limit(limits: Sequence[Optional[int]]) -> Optional[int]:
    """The smallest of the members' position limits (None where none names one)."""
    known = [x for x in limits if x is not None]
    return min(known) if known else None


class Ensemble:
    """A base and its (expert, anti-expert, weight) pairs over one shared tokenizer, validated once.

    Parameters
    ----------
    base : Member
    experts, anti_experts : sequences of Member, pairwise
    weights : None (1.0 per pair, none without pairs), a number for every pair, or one per pair
    tokenizer : the shared tokenizer, default the first member's own
    eos_token_ids : ids that end a row; default the tokenizer's EOS and every member's generation config's

    Attributes (read-only by convention): ``base``, ``experts``, ``anti_experts``, ``members`` (the model
    order), ``weights``, ``tokenizer``, ``vocab_size``, ``pad_token_id``, ``eos_token_ids``,
    ``position_limits`` and ``template_ids`` (per member, in the model order), ``device`` (the base's).
    """

    def __init__(self, base: Member, experts: Sequence[Member] = (), anti_experts: Sequence[Member] = (), *,
                 weights: Union[None, float, Sequence[float]] = None, tokenizer: Any = None,
                 eos_token_ids: Optional[Sequence[int]] = None):  # fmt: skip
        experts, anti_experts = check_pairs(experts, anti_experts)
        self.n_pairs = len(experts)
        self.weights = [1.0] * self.n_pairs if weights is None else check_weights(weights, self.n_pairs)
        self.base, self.experts, self.anti_experts = base, experts, anti_experts
        self.members: list[Member] = in_order(base, experts, anti_experts)
        # sampling runs on the base's device; a served base has none of its own: the first local member's
        self.device = next((m.device for m in self.members if m.device is not None), torch.device("cpu"))
        if tokenizer is None:
            tokenizer = next((m.tokenizer for m in self.members if m.tokenizer is not None), None)
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer=..., or load the base from a directory that has one")
        self.tokenizer = tokenizer
        self.vocab_size = common_vocab_size(tokenizer, [m.width for m in self.members if m.width is not None])
        check_same_tokens(("the shared tokenizer", tokenizer), [(m.name, m.tokenizer) for m in self.members], self.vocab_size)
        for m in self.members:
            m.join(tokenizer, self.vocab_size, self.device)
        self.eos_token_ids = frozenset(self._eos(eos_token_ids))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.position_limits = [m.position_limit for m in self.members]
        self.template_ids = [m.template_ids(tokenizer) for m in self.members]

    @classmethod
    def load(cls, base: Any, experts: Any = (), anti_experts: Any = (), *,
             weights: Union[None, float, Sequence[float]] = None, tokenizer: Any = None,
             dtype: Union[torch.dtype, str, None] = None, device: Union[str, torch.device, None] = None,
             eos_token_ids: Optional[Sequence[int]] = None, trust_remote_code: bool = False,
             progress: bool = False) -> "Ensemble":  # fmt: skip
        """The ensemble of models given as hub ids, directories, ``PreTrainedModel`` s or ``ModelSpec`` s
        (see :class:`~proxytune.ProxyTuner` for the arguments); an expert may be a LoRA adapter
        (``ModelSpec(adapter=...)``, a ``PeftModel``), its anti-expert then None (the adapter's recorded base)
        or its base model, and adapters over one base share one stacked forward
        (:mod:`proxytune.engine.adapter_experts`). Every cheap check (pairs, weights, paths, adapters, dtypes,
        devices, a tokenizer path) runs before the first model loads."""
        from proxytune.engine.adapter_experts import (check_not_shared, is_adapter, load_adapter_groups,
                                                      pair_anti_experts, plan_adapter_pair)  # fmt: skip
        from proxytune.engine.loading import ModelSpec, check_device, check_spec, load_model, load_tokenizer, parse_dtype

        experts = as_list(experts)
        adapters = [is_adapter(e) for e in experts]
        anti_experts = pair_anti_experts(adapters, anti_experts)
        if weights is not None:
            check_weights(weights, len(experts))
        check_bool(trust_remote_code, "trust_remote_code")
        dtype, device = parse_dtype(dtype), check_device(device, "device")
        names = role_names(len(experts))
        given = in_order(base, experts, anti_experts)
        is_pair_half = in_order(False, adapters, adapters)  # an adapter pair's members load as its group
        named = [(name, s if isinstance(s, (ModelSpec, Member)) else ModelSpec(s))
                 for name, s, half in zip(names, given, is_pair_half) if not half]  # fmt: skip
        for name, spec in named:
            if not isinstance(spec, Member):  # a member made by the caller (a served base) is taken as it is
                check_spec(spec, name)
        planned = [plan_adapter_pair(i, e, a, dtype=dtype, device=device)
                   for i, (e, a, adapter) in enumerate(zip(experts, anti_experts, adapters)) if adapter]  # fmt: skip
        check_not_shared(planned, named)
        for _, spec in named:  # a member made by the caller (a served base) reaches its server before the models
            if isinstance(spec, Member):
                spec.connect()
        if isinstance(tokenizer, (str, os.PathLike)):  # before the models: a bad path fails at once
            tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        if progress and len(named) > 1:
            from tqdm.auto import tqdm

            named = tqdm(named, desc="loading models", unit="model", leave=False)
        members = {name: spec if isinstance(spec, Member) else
                   load_model(spec, name, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                              progress=progress) for name, spec in named}  # fmt: skip
        for i, (expert, anti) in load_adapter_groups(planned, dtype=dtype, device=device,
                                                     trust_remote_code=trust_remote_code, progress=progress).items():
            members[f"expert {i}"], members[f"anti-expert {i}"] = expert, anti
        b, e, a = split_roles([members[name] for name in names], len(experts))
        return cls(b, e, a, weights=weights, tokenizer=tokenizer, eos_token_ids=eos_token_ids)

    @classmethod
    def of_modules(cls, base: Any, experts: Any = (), anti_experts: Any = (), **kwargs: Any) -> "Ensemble":
        """The ensemble of loaded ``PreTrainedModel`` s as they are (device and dtype kept)."""
        experts, anti_experts = check_pairs(experts, anti_experts)
        models = in_order(base, experts, anti_experts)
        members = [LocalModel.adopt(m, n) for m, n in zip(models, role_names(len(experts)))]
        return cls(*split_roles(members, len(experts)), **kwargs)

    # ------------------------------------------------------------------------------------------ the rules

    def pair_weights(self, weights: Union[None, float, Sequence[float]] = None, name: str = "weights") -> list[float]:
        """One weight per pair by the one weight rule; None: the ensemble's."""
        return list(self.weights) if weights is None else check_weights(weights, self.n_pairs, name)

    def split(self, items: Sequence[T]) -> tuple[T, list[T], list[T]]:
        """``(base's, experts', anti-experts')`` of per-member items in the model order."""
        return split_roles(items, self.n_pairs)

    def prompt_ids(self, index: int, prompt: Any) -> tuple[list[int], list[list[int]]]:
        """The shared prompt ids and each member's input ids (template ids spliced around the bare ids; a
        conversation in a chat member's chat template). ``ValueError`` naming the prompt for an empty input or
        an id outside a member's embedding."""
        conversation = is_messages(prompt)
        if conversation:
            check_messages(prompt, f"prompt {index}")
        text = messages_text(prompt) if conversation else prompt
        with_special, bare = encode_prompt(self.tokenizer, text, f"prompt {index}")
        per_member = []
        for m, tpl in zip(self.members, self.template_ids):
            if conversation and m.template is not None and m.template.chat:
                ids = chat_ids(m.tokenizer or self.tokenizer, prompt, m.name)
            else:
                ids = with_special if tpl is None else tpl[0] + bare + tpl[1]
            if not ids:
                how = "the tokenizer adds no BOS token" if tpl is None else "its template adds no text"
                raise ValueError(f"prompt {index} is empty for {m.name} and {how}: nothing to condition on")
            if max(ids) >= m.width or min(ids) < 0:
                bad = next(i for i in ids if not 0 <= i < m.width)
                raise ValueError(f"prompt {index} has token id {bad}, outside {m.name}'s embedding ({m.width} ids)")
            per_member.append(ids)
        return bare or with_special, per_member

    def room(self, lengths: Sequence[int]) -> tuple[Optional[int], Optional[Member], Optional[int]]:
        """``(room, member, limit)``: the fewest positions any member has left after ``lengths[k]`` positions
        of member ``k`` (None, None, None: no member names a limit), the member where it is fewest and that
        member's limit. The one position rule: generation, scoring and lm-eval's ``max_length`` read it."""
        best: tuple[Optional[int], Optional[Member], Optional[int]] = (None, None, None)
        for m, limit, used in zip(self.members, self.position_limits, lengths):
            if limit is not None and (best[0] is None or limit - used < best[0]):
                best = (limit - used, m, limit)
        return best

    def template_lengths(self) -> list[int]:
        """How many positions each member's template adds around a prompt."""
        return [len(t[0]) + len(t[1]) if t is not None else 0 for t in self.template_ids]

    def _eos(self, eos_token_ids: Any) -> set[int]:
        if eos_token_ids is not None:
            ids = [eos_token_ids] if isinstance(eos_token_ids, numbers.Integral) else as_list(eos_token_ids)
            bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
            if bad:
                raise TypeError(f"eos_token_ids must be non-negative integer token ids, got {bad[0]!r}")
            return {int(i) for i in ids}
        eos = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        for m in self.members:
            cfg = getattr(m.module, "generation_config", None) if m.module is not None else None
            ids = getattr(cfg, "eos_token_id", None) if cfg is not None else None
            eos.update(int(i) for i in as_list(ids) if i is not None)
        return eos

    def __repr__(self) -> str:
        pairs = ", ".join(f"({e.source} - {a.source}) x {w:g}" for e, a, w in zip(self.experts, self.anti_experts, self.weights))
        return f"Ensemble(base={self.base.source!r}, pairs=[{pairs}], vocab_size={self.vocab_size}, device={self.device})"

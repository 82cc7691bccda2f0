"""LoRA pairs as ensemble members: each expert (base + adapter) and its anti-expert (the base) are views of one
stacked forward (:class:`~proxytune.engine.adapters.StackedAdapterRunner`), behind the
:class:`~proxytune.engine.members.Member` interface, so the ensemble, the eager decoder and scoring take them as
they are.

:func:`adapter_pairs` returns ``(experts, anti_experts)``, ``n`` of each, for ``n`` adapters over one small
base: pass them to :class:`~proxytune.engine.ensemble.Ensemble` with any base. They share an
:class:`AdapterGroup`. The engine asks every member for a runner and calls each runner in turn with the same
arguments (``prefill``, then per step ``step`` and ``select``); the group runs the stacked forward on the
first view's call of a round and hands the other views their rows of it (**lockstep**: the k-th call of every
view of one batch is the same call). A view that asks for a call the others did not make (speculative
decoding, where the expert drafts alone and the pairs roll back different lengths) is refused with a clear
error: speculation over adapter pairs needs the speculative decoder to know the pairs share one forward,
which comes with the engine wiring. The members have no ``module``, so the static and CUDA-graph decoders
refuse them by the ensemble's rule (eager only, for now).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from proxytune.engine.adapters import Adapter, StackedAdapterRunner, check_adapter, read_adapter, stack_adapters
from proxytune.engine.members import Member, logits_width
from proxytune.engine.runner import position_limit

__all__ = ["AdapterGroup", "AdapterMember", "adapter_pairs"]


class _Batch:
    """One batch's stacked runner and the lockstep bookkeeping of its views."""

    def __init__(self, runner: StackedAdapterRunner, views: int):
        self.runner = runner
        self.views = views
        self.joined = 0
        self.done = 0  # calls made on the stacked runner
        self.last: Any = None  # (name, args, result) of the last call


class AdapterGroup:
    """The adapters over one small base, as one ``PeftModel`` (:func:`~proxytune.engine.adapters.stack_adapters`),
    and the batch their members' runners share. ``mixed``: :class:`StackedAdapterRunner`'s."""

    def __init__(self, peft_model: Any, names: Sequence[str], mixed: str = "auto"):
        self.model = peft_model
        self.names = list(names)
        self.mixed = mixed
        base = peft_model.get_base_model()
        self.device = next(base.parameters()).device
        self.width = logits_width(base)
        self.position_limit = position_limit(base)
        self.members: list["AdapterMember"] = []
        self._batch: Optional[_Batch] = None
        self._score: Optional[tuple] = None  # (ids, mask, keep, StackedLogits) of the last score call

    def _join(self) -> _Batch:
        b = self._batch
        if b is None or b.joined == b.views or b.done > 1:  # a full batch, or one left mid-way (an error): anew
            b = self._batch = _Batch(StackedAdapterRunner(self.model, self.names, self.mixed), len(self.members))
        b.joined += 1
        return b

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int):
        last = self._score
        if last is not None and last[2] == keep and _same(last[0], ids) and _same(last[1], mask):
            return last[3]
        out = StackedAdapterRunner(self.model, self.names, self.mixed).score_logits(ids, mask, keep)
        self._score = (ids, mask, keep, out)
        return out


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))  # a host sync (prefill only)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _ViewRunner:
    """One member's runner: its rows of the group's stacked calls (``group`` ``g`` of ``n + 1``; ``n`` is the base)."""

    def __init__(self, member: "AdapterMember"):
        self.member = member
        self.group = member.group
        self.device = self.group.device
        self.batch: Optional[_Batch] = None
        self.k = 0

    def _call(self, name: str, *args):
        if self.batch is None:
            if name != "prefill":
                raise RuntimeError(f"{self.member.name}: {name} before prefill")
            self.batch = self.group._join()
        b = self.batch
        if self.k == b.done:
            result = getattr(b.runner, name)(*args)
            b.last = (name, args, result)
            b.done += 1
        elif self.k == b.done - 1 and b.last[0] == name and _same(b.last[1], args):
            result = b.last[2]
        else:
            raise RuntimeError(
                f"{self.member.name}: its calls left the lockstep of the pairs that share one forward ({name} as call "
                f"{self.k}, the group at {b.done}); speculative decoding over LoRA adapter pairs is not wired yet: "
                f"use speculative_tokens=0")  # fmt: skip
        self.k += 1
        return result

    def _rows(self, stacked) -> Optional[torch.Tensor]:
        return None if stacked is None else stacked.stacked[self.member.slot]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._rows(self._call("prefill", input_ids, attention_mask))

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._rows(self._call("step", tokens))

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._rows(self._call("extend", tokens))

    def rollback(self, fed: int, kept: torch.Tensor) -> None:
        self._call("rollback", fed, kept)

    def select(self, rows: torch.Tensor) -> None:
        self._call("select", rows)


class AdapterMember(Member):
    """An expert (base + adapter ``slot``) or the anti-expert (the base, ``slot == n``) of an :class:`AdapterGroup`."""

    def __init__(self, group: AdapterGroup, slot: int, name: str, source: str):
        self.group, self.slot, self.name, self.source = group, slot, name, source
        self.device, self.width = group.device, group.width
        self.tokenizer = None
        self.template = None
        self.module = None  # one stacked forward for the group, not a module of its own: eager decoders only
        group.members.append(self)

    @property
    def position_limit(self) -> Optional[int]:
        return self.group.position_limit

    def runner(self, use_cache: bool = True) -> _ViewRunner:
        if not use_cache:
            raise ValueError(f"{self.name}: a LoRA adapter pair decodes with its KV cache (use_cache=False is not supported)")
        return _ViewRunner(self)

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        return self.group.score_logits(ids, mask, keep).stacked[self.slot]


def adapter_pairs(anti_module: Any, adapters: Sequence[Any], *, anti_source: Optional[str] = None,
                  names: Optional[Sequence[str]] = None, mixed: str = "auto",
                  first_pair: int = 0) -> tuple[list[AdapterMember], list[AdapterMember]]:  # fmt: skip
    """``(experts, anti_experts)``: one pair per adapter (a directory, a ``PeftModel`` or an :class:`Adapter`)
    over ``anti_module`` (named ``anti_source`` by the user, for the base check), every pair one view of a
    single stacked forward. Each adapter is checked against the anti-expert first
    (:func:`~proxytune.engine.adapters.check_adapter`). ``anti_module`` is wrapped in place
    (:func:`~proxytune.engine.adapters.stack_adapters`): do not use it as a plain model afterwards.
    ``first_pair``: the index of the first pair in the ensemble (for the members' names)."""
    read = [a if isinstance(a, Adapter) else read_adapter(a, f"expert_adapter {first_pair + i}")
            for i, a in enumerate(adapters)]  # fmt: skip
    for a in read:
        check_adapter(a, anti_module if anti_module is not None else a.peft_model, anti_source)
    model, names = stack_adapters(anti_module, read, names)
    group = AdapterGroup(model, names, mixed)
    experts = [AdapterMember(group, g, f"expert {first_pair + g}", a.source) for g, a in enumerate(read)]
    antis = [AdapterMember(group, len(read), f"anti-expert {first_pair + g}", anti_source or "the adapters' base")
             for g in range(len(read))]  # fmt: skip
    return experts, antis

"""LoRA pairs as ensemble members: each expert (base + adapter) and its anti-expert (the base) are views of one
stacked forward (:class:`~proxytune.engine.stacked_adapters.StackedAdapterRunner`), behind the
:class:`~proxytune.engine.members.Member` interface, so the ensemble, the eager and speculative decoders and
scoring take them as they are.

:func:`adapter_pairs` returns ``(experts, anti_experts)``, ``n`` of each, for ``n`` adapters over one small
base: pass them to :class:`~proxytune.engine.ensemble.Ensemble` with any base. They share an
:class:`AdapterGroup`. The engine asks every member for a runner and feeds each runner the same tokens; the
group keeps a **position log**: the token fed at each position since the last rollback or row move, and the
stacked logits there. A view asking for positions already fed gets its rows of the logged logits (after a
check that its tokens are the logged ones); a view asking past the log feeds the rest to *all* rows in one
stacked call. So an eager step is one stacked forward per step for all pairs; in speculative decoding the
drafting expert's one-token forwards feed the anti-expert's (and the other experts') rows too, and their
verification of the block then costs one stacked forward for the last draft only. A rollback is done once
for all rows (every view forgets what the rows did not keep), a row move (``select``) once.

Checks that cost a host sync: a token tensor that is not the logged one is compared by value (in speculative
rounds; an eager step feeds every view the same tensor, and that is never compared), and the ``kept`` counts
of a rollback. The members have no ``module``: the static and CUDA-graph decoders refuse them, saying why
(:attr:`AdapterMember.eager_only`), and ``decode="auto"`` picks the eager decoder.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from proxytune.engine.adapters import Adapter, check_adapter, read_adapter
from proxytune.engine.stacked_adapters import StackedAdapterRunner, stack_adapters
from proxytune.engine.members import Member, logits_width
from proxytune.engine.runner import position_limit

__all__ = ["AdapterGroup", "AdapterMember", "adapter_pairs", "load_adapter_pairs", "recorded_base_of"]


class _Batch:
    """One batch's stacked runner, its position log and the views that read it."""

    def __init__(self, runner: StackedAdapterRunner, views: int):
        self.runner = runner
        self.views = views
        self.joined: list["_ViewRunner"] = []
        self.prefill: Optional[tuple] = None  # (ids, mask, StackedLogits)
        self.start = 0  # position of log[0]
        self.fed = 0  # positions fed since the last rollback or row move
        self.log: list[tuple] = []  # per position: (tokens [B], stacked logits [n + 1, B, W])
        self.epoch = 0  # rollbacks and row moves done
        self.last_move: Any = None  # the rows or kept counts of the last one (the others are checked against it)

    @property
    def progressed(self) -> bool:
        return self.fed > 0 or self.epoch > 0

    def trim(self) -> None:
        """Forget the positions every view has read."""
        low = min(v.pos for v in self.joined)
        if low > self.start:
            del self.log[: low - self.start]
            self.start = low


class AdapterGroup:
    """The adapters over one small base, as one ``PeftModel`` (:func:`~proxytune.engine.stacked_adapters.stack_adapters`),
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

    def _join(self, view: "_ViewRunner") -> _Batch:
        b = self._batch
        if b is None or len(b.joined) == b.views or b.progressed:  # a full batch, or one left mid-way: anew
            b = self._batch = _Batch(StackedAdapterRunner(self.model, self.names, self.mixed), len(self.members))
        b.joined.append(view)
        return b

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int):
        last = self._score
        if last is not None and last[2] == keep and _same(last[0], ids) and _same(last[1], mask):
            return last[3]
        out = StackedAdapterRunner(self.model, self.names, self.mixed).score_logits(ids, mask, keep)
        self._score = (ids, mask, keep, out)
        return out


def _same(a: Any, b: Any) -> bool:
    """The same tensor, or equal values (a host sync where the data is on a GPU)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _ViewRunner:
    """One member's runner: its rows (``slot`` of ``n + 1`` groups; ``n`` is the base's) of the group's stacked
    calls, read from the batch's position log."""

    def __init__(self, member: "AdapterMember"):
        self.member = member
        self.group = member.group
        self.device = self.group.device
        self.batch: Optional[_Batch] = None
        self.pos = 0  # positions this view has been fed since the last rollback or row move
        self.epoch = 0

    def _out_of_step(self, what: str) -> RuntimeError:
        return RuntimeError(f"{self.member.name}: {what}: the views of one stacked LoRA forward must be fed the same "
                            f"tokens and moved together")  # fmt: skip

    def _ready(self) -> _Batch:
        b = self.batch
        if b is None:
            raise self._out_of_step("fed before prefill")
        if self.epoch != b.epoch:
            raise self._out_of_step("fed before its rollback or row move")
        return b

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b = self.batch = self.group._join(self)
        if b.prefill is None:
            b.prefill = (input_ids, attention_mask, b.runner.prefill(input_ids, attention_mask))
        elif not (_same(b.prefill[0], input_ids) and _same(b.prefill[1], attention_mask)):
            raise self._out_of_step("prefilled with other prompts than the other views")
        self.pos, self.epoch = 0, b.epoch
        return b.prefill[2].stacked[self.member.slot]

    def _feed(self, tokens: Sequence[torch.Tensor], extend: bool) -> torch.Tensor:
        """Positions ``pos ..`` of this view fed ``tokens`` (one ``[B]`` tensor per position); ``[B, m, W]``.
        New positions go through the runner's ``extend`` (which clamps positions past the model's limit, as
        speculation needs) when the view was asked to extend, else through ``step``."""
        b = self._ready()
        m = len(tokens)
        for j in range(m):
            p = self.pos + j
            if p >= b.fed:  # past the log: feed the rest to every row at once
                rest = tokens[j:]
                if len(rest) == 1 and not extend:
                    logits = b.runner.step(rest[0]).stacked[:, :, None]
                else:
                    logits = b.runner.extend(torch.stack(list(rest), dim=1)).stacked
                b.log += [(t, logits[:, :, i]) for i, t in enumerate(rest)]
                b.fed += len(rest)
                break
            if not _same(b.log[p - b.start][0], tokens[j]):
                raise self._out_of_step(f"fed another token than the other views at position {p}")
        out = torch.stack([b.log[self.pos + j - b.start][1][self.member.slot] for j in range(m)], dim=1)
        self.pos += m
        b.trim()
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._feed([tokens], extend=False)[:, 0]

    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._feed(list(tokens.unbind(1)), extend=True)

    def rollback(self, fed: int, kept: torch.Tensor) -> None:
        """The first view's rollback in a round rolls every row back by all the round fed; the others check."""
        b = self.batch
        if b is None or fed != self.pos:
            raise self._out_of_step(f"rollback of {fed} tokens after {self.pos} fed")
        if self.epoch == b.epoch:
            b.runner.rollback(b.fed, kept)
            b.epoch += 1
            b.fed = b.start = 0
            b.log = []
            b.last_move = ("rollback", kept)
        elif self.epoch != b.epoch - 1 or b.last_move[0] != "rollback" or not _same(b.last_move[1], kept):
            raise self._out_of_step("rolled back to other counts than the other views")
        self.epoch, self.pos = b.epoch, 0

    def select(self, rows: torch.Tensor) -> None:
        """The first view's row move moves every group's rows; the others check."""
        b = self.batch
        if b is None:
            raise self._out_of_step("rows moved before prefill")
        if self.epoch == b.epoch:
            if self.pos != b.fed:
                raise self._out_of_step("rows moved with positions unread")
            b.runner.select(rows)
            b.epoch += 1
            b.last_move = ("select", rows, b.fed)
            b.fed = b.start = 0
            b.log = []
        elif (self.epoch != b.epoch - 1 or b.last_move[0] != "select" or self.pos != b.last_move[2]
              or not _same(b.last_move[1], rows)):  # fmt: skip
            raise self._out_of_step("moved to other rows, or at another position, than the other views")
        self.epoch, self.pos = b.epoch, 0


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

    @property
    def eager_only(self) -> str:
        pair = self.name.split()[-1]
        return (f"{self.name} ({self.source}) is one half of LoRA pair {pair}, which runs as one stacked forward "
                f"over the adapter's base model in the eager decoders (decode='auto' or 'eager'; speculative "
                f"decoding works too)")  # fmt: skip

    def runner(self, use_cache: bool = True) -> _ViewRunner:
        if not use_cache:
            raise ValueError(f"{self.name}: a LoRA adapter pair decodes with its KV cache (use_cache=False is not supported)")
        return _ViewRunner(self)

    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
        return self.group.score_logits(ids, mask, keep).stacked[self.slot]


def adapter_pairs(anti_module: Any, adapters: Sequence[Any], *, anti_source: Optional[str] = None,
                  names: Optional[Sequence[str]] = None, mixed: str = "auto", pairs: Optional[Sequence[int]] = None,
                  tokenizer: Any = None, anti_argument: str = "anti_expert") -> tuple[list[AdapterMember], list[AdapterMember]]:  # fmt: skip
    """``(experts, anti_experts)``: one pair per adapter (a directory, a ``PeftModel`` or an :class:`Adapter`)
    over ``anti_module`` (named ``anti_source`` by the user, for the base check), every pair one view of a
    single stacked forward. Each adapter is checked against the anti-expert first
    (:func:`~proxytune.engine.adapters.check_adapter`; ``anti_argument`` names the anti-expert in its errors).
    ``anti_module`` is wrapped in place (:func:`~proxytune.engine.stacked_adapters.stack_adapters`): do not use
    it as a plain model afterwards. ``pairs``: each adapter's pair index in the ensemble (for the members'
    names; default ``0, 1, ...``); ``tokenizer``: the base's own tokenizer, given to every member (for the
    ensemble's shared-vocabulary check)."""
    pairs = list(pairs) if pairs is not None else list(range(len(adapters)))
    if len(pairs) != len(adapters):
        raise ValueError(f"pairs: one pair index per adapter ({len(adapters)}), got {len(pairs)}")
    read = [a if isinstance(a, Adapter) else read_adapter(a, f"expert_adapter {p}") for p, a in zip(pairs, adapters)]
    for a in read:
        own = a.peft_model.get_base_model() if a.peft_model is not None else None
        check_adapter(a, anti_module if anti_module is not None else own, anti_source, anti_argument)
    model, names = stack_adapters(anti_module, read, names)
    group = AdapterGroup(model, names, mixed)
    experts = [AdapterMember(group, g, f"expert {p}", a.source) for g, (p, a) in enumerate(zip(pairs, read))]
    antis = [AdapterMember(group, len(read), f"anti-expert {p}", anti_source or "the adapters' base") for p in pairs]
    for m in experts + antis:
        m.tokenizer = tokenizer
    return experts, antis


def recorded_base_of(adapters: Sequence[Adapter], argument: str = "anti_expert") -> str:
    """The directory of the adapters' recorded base on this machine (every adapter must record the same one,
    found by :func:`~proxytune.engine.adapters.recorded_base_path`): the anti-expert when none is named.
    :class:`~proxytune.engine.adapters.AdapterError` naming ``argument`` otherwise."""
    from proxytune.engine.adapters import AdapterError, recorded_base_path

    found = {recorded_base_path(a) for a in adapters}
    recorded = sorted({str(a.recorded_base) for a in adapters})
    if None in found or len(found) != 1:
        raise AdapterError(f"{argument}: not given, and the adapters' recorded base "
                           + (f"{recorded[0]!r} is not on this machine" if len(recorded) == 1 and None in found
                              else f"is not one model found here ({', '.join(recorded)})")
                           + "; name the anti-expert (the adapters' base)")  # fmt: skip
    return found.pop()


def load_adapter_pairs(adapters: Sequence[Any], anti_expert: Any = None, *, dtype: Any = None, device: Any = None,
                       trust_remote_code: bool = False, mixed: str = "auto", pairs: Optional[Sequence[int]] = None,
                       progress: bool = False, anti_argument: str = "anti_expert",
                       ) -> tuple[list[AdapterMember], list[AdapterMember]]:  # fmt: skip
    """:func:`adapter_pairs` with the anti-expert loaded: ``anti_expert`` (a directory, a hub id, a
    ``ModelSpec`` or a loaded model), or, when it is None, the adapters' recorded base
    (:func:`recorded_base_of`) or, for adapters inside a ``PeftModel``, that model's own base. Loaded by the
    engine's :func:`~proxytune.engine.loading.load_model` (safetensors only, its own tokenizer, the default
    dtype and device rules). ``Ensemble.load`` calls this once per group of adapter experts that share an
    anti-expert (:mod:`proxytune.engine.adapter_experts`)."""
    from proxytune.engine.adapters import AdapterError
    from proxytune.engine.loading import ModelSpec, check_device, load_model, parse_dtype

    pairs = list(pairs) if pairs is not None else list(range(len(adapters)))
    read = [a if isinstance(a, Adapter) else read_adapter(a, f"expert_adapter {p}") for p, a in zip(pairs, adapters)]
    if not read:
        raise AdapterError("expert_adapter: no adapters given")
    if anti_expert is None and all(a.peft_model is not None for a in read):  # their base is in hand
        return adapter_pairs(None, read, mixed=mixed, pairs=pairs, names=[a.peft_name for a in read])
    if anti_expert is None:
        anti_expert = recorded_base_of(read, anti_argument)
    spec = anti_expert if isinstance(anti_expert, ModelSpec) else ModelSpec(anti_expert)
    member = load_model(spec, f"anti-expert {pairs[0]}", dtype=parse_dtype(dtype), device=check_device(device),
                        trust_remote_code=trust_remote_code, progress=progress)  # fmt: skip
    source = spec.model if isinstance(spec.model, (str, os.PathLike)) else None
    return adapter_pairs(member.module, read, anti_source=os.fspath(source) if source is not None else None,
                         mixed=mixed, pairs=pairs, tokenizer=member.tokenizer, anti_argument=anti_argument)  # fmt: skip

"""Experts given as LoRA adapters to :meth:`Ensemble.load <proxytune.engine.ensemble.Ensemble.load>`: which
experts are adapters, which model each one's anti-expert is, which pairs share one stacked forward, and
loading them (``docs/lora.md``).

* An expert is an adapter when it is a ``ModelSpec(adapter=...)``, a loaded ``peft.PeftModel`` (its active
  adapter) or an :class:`~proxytune.engine.adapters.Adapter` (:func:`is_adapter`).
* Its anti-expert is the entry at the same index of ``anti_experts``, or None: the adapter's recorded base
  found on this machine (:func:`~proxytune.engine.adapter_members.recorded_base_of`), or a ``PeftModel``'s own
  base. The one pairing rule (:func:`pair_anti_experts`) also reads a list that names only the ordinary
  experts' anti-experts (the adapters' are then their recorded bases); the CLI and lm-eval call it too.
* Pairs whose anti-experts are the same model (the same directory by real path, the same hub id, the same
  model object; the same dtype and device) form one group: that model is loaded once and the group's adapters
  all run in one stacked forward (:func:`~proxytune.engine.adapter_members.load_adapter_pairs`). A named
  anti-expert that is not an adapter's base is an error
  (:func:`~proxytune.engine.adapters.check_adapter`).

The cheap part (:func:`plan_adapter_pair`: reading each adapter, checking its spec and its anti-expert's)
runs before any model loads. peft is imported only when an adapter is read.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from proxytune.engine.adapters import Adapter, check_base, read_adapter
from proxytune.engine.loading import ModelLoadError, ModelSpec, check_device, check_spec, parse_dtype, resolve_source
from proxytune.engine.requests import as_list

__all__ = ["is_adapter", "pair_anti_experts", "AdapterPair", "plan_adapter_pair", "check_not_shared",
           "load_adapter_groups"]


def _is_peft_model(x: Any) -> bool:
    peft = sys.modules.get("peft")  # a PeftModel exists only where peft was imported
    return peft is not None and isinstance(x, peft.PeftModel)


def is_adapter(expert: Any) -> bool:
    """Whether an expert as given is a LoRA adapter (``ModelSpec(adapter=...)``, ``PeftModel`` or ``Adapter``)."""
    if isinstance(expert, ModelSpec):
        return expert.adapter is not None
    return isinstance(expert, Adapter) or _is_peft_model(expert)


def pair_anti_experts(adapters: Sequence[bool], anti_experts: Any, *, experts_name: str = "experts",
                      adapters_name: str = "adapter experts", anti_name: str = "anti-experts") -> list:  # fmt: skip
    """One anti-expert per expert (``adapters[i]``: whether expert ``i`` is an adapter), None where an adapter
    takes its recorded base. ``anti_experts``: None (every expert an adapter), one per expert (None allowed for
    an adapter), or one per ordinary expert, in order (the adapters' then None). ``ValueError`` otherwise,
    naming the arguments as ``experts_name`` (ordinary experts), ``adapters_name`` and ``anti_name``."""
    n, plain = len(adapters), len(adapters) - sum(adapters)
    given = [None] * n if anti_experts is None else as_list(anti_experts)
    if len(given) == n:
        out = given
    elif len(given) == plain:
        rest = iter(given)
        out = [None if a else next(rest) for a in adapters]
    else:
        what = f"{plain} {experts_name}" + (f" and {n - plain} {adapters_name}" if plain < n else "")
        how = "they come in pairs" if plain == n else (
            "give one per pair, or one per ordinary expert (an adapter's anti-expert is then its recorded base)")
        raise ValueError(f"got {what} but {len(given)} {anti_name}; {how}")
    missing = next((i for i, (a, x) in enumerate(zip(adapters, out)) if x is None and not a), None)
    if missing is not None:
        raise ValueError(f"{anti_name}: pair {missing} has no anti-expert (only an adapter's defaults to its base)")
    return out


@dataclass
class AdapterPair:
    """One adapter expert as planned: its pair index, the adapter read, its anti-expert (a spec; None: a
    ``PeftModel``'s own base) and the key of its group (pairs with equal keys share one stacked forward)."""

    index: int
    adapter: Adapter
    anti: Optional[ModelSpec]
    key: tuple


def plan_adapter_pair(index: int, expert: Any, anti_expert: Any, *, dtype: Any = None, device: Any = None) -> AdapterPair:
    """Read adapter expert ``index`` and name its anti-expert (cheap: no model loads). ``dtype``/``device``:
    the ensemble's defaults, for the group key. Errors name ``expert {index}`` / ``anti-expert {index}``."""
    name, anti_name = f"expert {index}", f"anti-expert {index}"
    spec = expert if isinstance(expert, ModelSpec) else ModelSpec(adapter=expert)
    if spec.model is not None:
        raise ModelLoadError(f"{name}: give model= or adapter=, not both (a LoRA adapter's base is its "
                             "anti-expert: name it in anti_experts)")  # fmt: skip
    for field in ("template", "tokenizer"):
        if getattr(spec, field) is not None:
            raise ModelLoadError(f"{name}: a LoRA adapter takes no {field}: it runs in one stacked forward with "
                                 "its base, over the same prompt ids")  # fmt: skip
    parse_dtype(spec.dtype, f"{name}: dtype")
    check_device(spec.device, f"{name}: device")
    adapter = spec.adapter if isinstance(spec.adapter, Adapter) else read_adapter(spec.adapter, name)
    if anti_expert is None:
        if adapter.peft_model is not None:
            return AdapterPair(index, adapter, None, ("peft", id(adapter.peft_model)))
        from proxytune.engine.adapter_members import recorded_base_of

        anti_expert = recorded_base_of([adapter], anti_name)
    anti = anti_expert if isinstance(anti_expert, ModelSpec) else ModelSpec(anti_expert)
    if anti.adapter is not None or is_adapter(anti.model):
        raise ModelLoadError(f"{anti_name}: an anti-expert is a model, not an adapter")
    if anti.template is not None:
        raise ModelLoadError(f"{anti_name}: the base of a LoRA adapter runs in one stacked forward with it, over "
                             "the same prompt ids; it takes no template")  # fmt: skip
    anti = replace(anti, dtype=anti.dtype if anti.dtype is not None else spec.dtype,
                   device=anti.device if anti.device is not None else spec.device)  # fmt: skip
    check_spec(anti, anti_name)
    if adapter.peft_model is not None:  # it runs over its own base; the named one is compared with it
        return AdapterPair(index, adapter, anti, ("peft", id(adapter.peft_model)))
    where = (str(parse_dtype(anti.dtype) or parse_dtype(dtype)), str(check_device(anti.device) or device))
    if isinstance(anti.model, (str, os.PathLike)):
        source = resolve_source(anti.model, anti_name)
        source = os.path.realpath(source) if Path(source).is_dir() else source
        return AdapterPair(index, adapter, anti, ("source", source, *where))
    return AdapterPair(index, adapter, anti, ("module", id(anti.model), *where))


def _wrapped(pair: AdapterPair) -> list:
    """The model objects a pair's stacked forward runs over (PEFT puts its layers into them): a ``PeftModel``
    and its base, or a loaded anti-expert module; [] where the anti-expert is loaded from a path."""
    if pair.adapter.peft_model is not None:
        return [pair.adapter.peft_model, pair.adapter.peft_model.get_base_model()]
    if pair.anti is not None and not isinstance(pair.anti.model, (str, os.PathLike)):
        return [pair.anti.model]
    return []


def check_not_shared(pairs: Sequence[AdapterPair], others: Sequence[tuple[str, Any]]) -> None:
    """A model object an adapter pair runs over must not also be one of ``others`` (``(role name, model or
    spec)``, the ensemble's plain members): PEFT wraps it in place, so as a plain member it would run with an
    adapter on. ``ModelLoadError`` naming both roles."""
    plain: dict[int, str] = {}
    for name, given in others:
        model = given.model if isinstance(given, ModelSpec) else getattr(given, "module", given)
        if not isinstance(model, (str, os.PathLike)) and model is not None:
            plain.setdefault(id(model), name)
    for p in pairs:
        for module in _wrapped(p):
            if id(module) in plain:
                raise ModelLoadError(
                    f"anti-expert {p.index}: the same model object is also the {plain[id(module)]}; LoRA pair "
                    f"{p.index} runs its adapter over that model, wrapped in place, so it cannot also run as a plain "
                    f"model: give the {plain[id(module)]} its own copy, or its directory"
                )


def _source(spec: ModelSpec) -> Optional[str]:
    return os.fspath(spec.model) if isinstance(spec.model, (str, os.PathLike)) else None


def load_adapter_groups(pairs: Sequence[AdapterPair], *, dtype: Any = None, device: Any = None,
                        trust_remote_code: bool = False, progress: bool = False) -> dict[int, tuple]:  # fmt: skip
    """``{pair index: (expert member, anti-expert member)}`` for the planned pairs, one stacked forward (and
    one loaded base model) per group."""
    from proxytune.engine.adapter_members import adapter_pairs, load_adapter_pairs
    from proxytune.engine.loading import load_model

    groups: dict[tuple, list[AdapterPair]] = {}
    for p in pairs:
        groups.setdefault(p.key, []).append(p)
    out = {}
    for key, group in groups.items():
        indices = [p.index for p in group]
        if key[0] == "peft":  # adapters inside one PeftModel: over its own base; a named anti-expert must be it
            for p in group:
                if p.anti is not None:
                    named = p.anti.model if not isinstance(p.anti.model, (str, os.PathLike)) else load_model(
                        p.anti, f"anti-expert {p.index}", dtype=parse_dtype(dtype), device=device,
                        trust_remote_code=trust_remote_code, progress=progress).module  # fmt: skip
                    check_base(p.adapter, named, _source(p.anti), f"anti-expert {p.index}")
            experts, antis = adapter_pairs(None, [p.adapter for p in group], pairs=indices,
                                           names=[p.adapter.peft_name for p in group])  # fmt: skip
        else:
            anti = group[0].anti
            argument = f"anti-expert {indices[0]}" if len(group) == 1 else "anti-experts " + ", ".join(map(str, indices))
            experts, antis = load_adapter_pairs([p.adapter for p in group], anti, dtype=dtype, device=device,
                                                trust_remote_code=trust_remote_code, pairs=indices, progress=progress,
                                                anti_argument=argument)  # fmt: skip
        for p, e, a in zip(group, experts, antis):
            out[p.index] = (e, a)
    return out

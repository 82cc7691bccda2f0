"""The stacked forward of LoRA experts: n adapters and their base as one forward over shared weights.

One ``PeftModel`` holds
several named adapters over one small base. For ``B`` prompts and ``n`` adapters the runner feeds
``(n + 1) * B`` rows through one forward: rows
``g * B .. g * B + B - 1`` go through adapter ``g`` (expert ``g``), the last ``B`` rows through the base alone
(``"__base__"``, the shared anti-expert). The base weights are read once per step for all of them; the
adapters' low-rank products run only on their rows. One ``DynamicCache`` holds the stacked rows; when rows of
the batch finish, :meth:`StackedAdapterRunner.select` keeps the same rows of every group (``index_select`` on
the cache's batch dimension). Logits are ``[n + 1, B, W]`` (:class:`StackedLogits` names the parts).

Two ways to apply the adapters to their rows inside that one forward (``StackedAdapterRunner(mixed=...)``):
``"peft"``, PEFT's own mixed-adapter batch (``adapter_names=[...]``: per LoRA layer it builds index lists
in Python and gathers and scatters the rows of each adapter), and ``"slices"`` (the default where it applies),
:class:`GroupSlices`: forward hooks on PEFT's LoRA layers with the layers' own adapters switched off; each
layer's base output for all rows, then for group ``g`` the low-rank product on the contiguous rows
``g * B .. g * B + B - 1`` added in place (views: no gathers, no Python lists, no host-to-device index copies,
so nothing in it stops a CUDA graph). "slices" covers plain LoRA on linear layers; an adapter with LoRA on an
embedding, a LoRA variant (DoRA, aLoRA, ...) or whole trained modules (``modules_to_save``) runs "peft".

Adapters are read and checked by :mod:`proxytune.engine.adapters`; ``peft`` is imported only when an adapter
is used.
"""

from __future__ import annotations

__all__ = ["stack_adapters", "StackedLogits", "StackedAdapterRunner", "GroupSlices", "slices_apply"]

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from proxytune.engine.adapters import BASE_ROWS, Adapter, AdapterError, check_architecture, require_peft
from proxytune.engine.prompts import position_ids
from proxytune.engine.runner import cache_argument, forget_tail, forward_parameters, position_limit, to_device


def stack_adapters(anti_module: Any, adapters: Sequence[Adapter], names: Optional[Sequence[str]] = None):
    """One ``PeftModel`` over ``anti_module`` holding every adapter, named ``names`` (default ``expert0``,
    ``expert1``, ...); returns ``(peft_model, names)``.

    ``anti_module`` is wrapped **in place**: PEFT puts LoRA layers into it, so it must then be called only
    through the returned model with ``adapter_names`` (as :class:`StackedAdapterRunner` does), never as a plain
    anti-expert (a plain call would apply the active adapter). Adapters given inside a ``PeftModel`` over this
    same module are used where they are. Each adapter is checked against the module first
    (:func:`check_architecture`); :func:`check_base` is the caller's, who knows how the anti-expert was named."""
    require_peft()
    from peft import PeftModel, set_peft_model_state_dict

    names = list(names) if names is not None else [f"expert{i}" for i in range(len(adapters))]
    if len(names) != len(adapters) or len(set(names)) != len(names) or BASE_ROWS in names:
        raise AdapterError(f"adapter names must be distinct, one per adapter, and not {BASE_ROWS!r}: {names}")
    if not adapters:
        raise AdapterError("expert_adapter: no adapters to stack")
    model = None
    for a in adapters:
        if a.peft_model is not None:
            model = a.peft_model
            break
    base = model.get_base_model() if model is not None else anti_module
    if model is not None and any(getattr(m, "merged", False) for m in model.modules() if hasattr(m, "lora_A")):
        raise AdapterError("expert_adapter: the PeftModel has an adapter merged into its base weights, so its base "
                           "is no longer the anti-expert; unmerge it first (PeftModel.unmerge_adapter())")  # fmt: skip
    if model is not None and anti_module is not None and anti_module is not base and anti_module is not model:
        raise AdapterError("anti_expert: a PeftModel's adapters run over its own base; give that base (or nothing)")
    for a in adapters:
        check_architecture(a, base)
    for a, name in zip(adapters, names):
        if a.peft_model is not None:
            if a.peft_model is not model:
                raise AdapterError(f"{a.argument}: adapters from two different PeftModels cannot share one forward")
            if a.peft_name != name:
                raise AdapterError(f"{a.argument}: an adapter inside a PeftModel keeps its name {a.peft_name!r}; "
                                   f"name it so (got {name!r})")  # fmt: skip
            continue
        config = _peft_config(a)
        if model is None:
            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question: not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
                model = PeftModel(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        result = set_peft_model_state_dict(model, a.weights, adapter_name=name)
        missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k and ".lora_" in k]
        if missing:
            raise AdapterError(f"{a.argument} {a.source}: the adapter lacks weights for {missing[:3]}")
    model.eval()
    return model, names


def _peft_config(a: Adapter):
    from peft import LoraConfig

    known = set(LoraConfig.__dataclass_fields__)
    cfg = {k: v for k, v in a.config.items() if k in known}
    cfg["inference_mode"] = True
    try:
        return LoraConfig(**cfg)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{a.argument} {a.source}: its adapter_config.json is not a LoRA config PEFT accepts: {e}") from e


def slices_apply(peft_model: Any, names: Sequence[str]) -> bool:
    """Whether :class:`GroupSlices` can run ``names``' adapters: every LoRA layer that holds one of them is a
    linear LoRA layer without a variant (DoRA, aLoRA, ...) and without a LoRA bias, and none of them trains a
    whole module or token rows (``modules_to_save``, ``trainable_token_indices``: PEFT's wrappers pick those by
    the active adapter, not by row; PEFT's mixed batch picks them per row)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear
    from peft.utils.other import AuxiliaryTrainingWrapper

    for m in peft_model.modules():
        if isinstance(m, AuxiliaryTrainingWrapper) and any(n in m._get_available_adapters() for n in names):
            return False
        if not isinstance(m, LoraLayer):
            continue
        held = [n for n in names if n in m.lora_A or n in getattr(m, "lora_embedding_A", {})]
        if not held:
            continue
        if not isinstance(m, Linear) or any(n in m.lora_variant or n not in m.lora_A for n in held):
            return False
        if any(getattr(m.lora_B[n], "bias", None) is not None for n in held):
            return False
    return True


class GroupSlices:
    """The adapters of a stacked batch applied on contiguous row groups (see the module docstring).

    Installed once per ``PeftModel`` (:meth:`of`): a forward hook on every LoRA layer. While :attr:`batch` is
    set (``> 0``, inside :meth:`rows`), the layers' own adapters are off and each hook adds
    ``scaling * B_g(A_g(x[g*B:(g+1)*B]))`` to the rows of group ``g``, in place. Outside :meth:`rows` the
    hooks do nothing and the layers' adapters are as PEFT left them."""

    _attr = "_proxytune_group_slices"

    def __init__(self, peft_model: Any):
        from peft.tuners.lora import LoraLayer

        self.names: list = []
        self.batch = 0
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    @classmethod
    def of(cls, peft_model: Any) -> "GroupSlices":
        found = getattr(peft_model, cls._attr, None)
        if found is None:
            found = cls(peft_model)
            setattr(peft_model, cls._attr, found)
        return found

    def rows(self, names: Sequence[str], batch: int):
        """A context: group ``g`` (``g < len(names)``) of ``batch`` rows runs adapter ``names[g]``; the rows
        after the last group run the base alone."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            saved = [m._disable_adapters for m in self.layers]
            for m in self.layers:
                m._disable_adapters = True  # the layer returns its base output; the hook adds the groups'
            self.names, self.batch = list(names), batch
            try:
                yield
            finally:
                self.names, self.batch = [], 0
                for m, d in zip(self.layers, saved):
                    m._disable_adapters = d

        return scope()

    def _hook(self, module, args, output):
        if not self.batch:
            return None
        x = args[0]
        b = self.batch
        for g, name in enumerate(self.names):
            if name not in module.lora_A:
                continue
            a = module.lora_A[name]
            rows = x[g * b:(g + 1) * b].to(a.weight.dtype)
            delta = module.lora_B[name](a(module.lora_dropout[name](rows))) * module.scaling[name]
            output[g * b:(g + 1) * b] += delta.to(output.dtype)
        return output


@dataclass
class StackedLogits:
    """The logits of one stacked forward, ``[n + 1, B, W]`` (or ``[n + 1, B, k, W]`` from ``extend``):
    ``experts[g]`` is adapter ``g``'s rows, ``anti`` the base's."""

    stacked: torch.Tensor

    @property
    def experts(self) -> list:
        return list(self.stacked[:-1].unbind(0))

    @property
    def anti(self) -> torch.Tensor:
        return self.stacked[-1]


class StackedAdapterRunner:
    """The rows of a batch of ``B`` prompts, run once per adapter and once by the base, as ``(n + 1) * B``
    rows of one forward with one ``DynamicCache`` (see the module docstring for the row layout). The methods
    follow :class:`~proxytune.engine.runner.ModelRunner` (``prefill``, ``step``, ``extend``, ``rollback``,
    ``select``) and take and return per-prompt shapes: the stacking is inside. No host sync in ``step``
    (``mixed="peft"`` copies PEFT's row indices to the device in every LoRA layer); ``rollback`` has
    ModelRunner's one (the crop length). ``mixed``: ``"slices"``, ``"peft"`` or ``"auto"`` (slices where
    :func:`slices_apply`)."""

    def __init__(self, peft_model: Any, names: Sequence[str], mixed: str = "auto"):
        if mixed not in ("auto", "slices", "peft"):
            raise ValueError(f"mixed must be 'auto', 'slices' or 'peft', got {mixed!r}")
        can_slice = slices_apply(peft_model, names)
        if mixed == "slices" and not can_slice:
            raise AdapterError("expert_adapter: mixed='slices' needs plain LoRA on linear layers (no embedding "
                               "LoRA, no DoRA or other variant, no modules_to_save); use mixed='peft'")  # fmt: skip
        self.mixed = "slices" if mixed == "auto" and can_slice else "peft" if mixed == "auto" else mixed
        self._slices = GroupSlices.of(peft_model) if self.mixed == "slices" else None
        self.model = peft_model
        self.names = list(names)
        self.groups = len(self.names) + 1
        base = peft_model.get_base_model()
        self.device = next(base.parameters()).device
        self._cache_arg = cache_argument(base)  # the PeftModel's forward passes it through by name
        self._keep_one = "logits_to_keep" in forward_parameters(base)
        self._limit = position_limit(base)
        self._config = base.config
        self.batch = 0
        self.cache = None
        self.mask: Optional[torch.Tensor] = None  # [(n + 1) * B, L]
        self.next_pos: Optional[torch.Tensor] = None  # [(n + 1) * B]

    def _adapter_names(self) -> list:
        return [n for n in self.names for _ in range(self.batch)] + [BASE_ROWS] * self.batch

    def _stack(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(self.groups, *([1] * (x.dim() - 1)))

    def _unstack(self, logits: torch.Tensor) -> StackedLogits:
        return StackedLogits(logits.view(self.groups, self.batch, *logits.shape[1:]))

    def _call(self, **kwargs):
        if self._slices is None:
            return self.model(adapter_names=self._adapter_names(), **kwargs)
        with self._slices.rows(self.names, self.batch):
            return self.model(**kwargs)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep: int) -> torch.Tensor:
        extra = {"logits_to_keep": keep} if self._keep_one else {}
        out = self._call(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
                         **{self._cache_arg: self.cache}, **extra)  # fmt: skip
        return out.logits[:, -keep:]

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> StackedLogits:
        """Left-padded prompts ``[B, L]``; returns the last position's logits, ``stacked [n + 1, B, W]``."""
        from transformers import DynamicCache

        self.batch = int(input_ids.shape[0])
        ids = self._stack(to_device(input_ids, self.device))
        self.mask = self._stack(to_device(attention_mask, self.device))
        pos = position_ids(self.mask)
        self.next_pos = pos[:, -1] + 1
        self.cache = DynamicCache(config=self._config)
        return self._unstack(self._forward(ids, pos, 1)[:, -1])

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> StackedLogits:
        """One token per prompt (``[B]``: every pair of a prompt is fed the same token, the combined
        sample); returns ``stacked [n + 1, B, W]``."""
        tokens = self._stack(to_device(tokens, self.device))[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self._forward(tokens, self.next_pos[:, None], 1)[:, -1]
        self.next_pos = self.next_pos + 1
        return self._unstack(logits)

    @torch.inference_mode()
    def extend(self, tokens: torch.Tensor) -> StackedLogits:
        """``k`` tokens per prompt (``[B, k]``) in one forward; returns ``stacked [n + 1, B, k, W]``. Positions
        past the model's limit are clamped, as :meth:`ModelRunner.extend` does."""
        tokens = self._stack(to_device(tokens, self.device))
        k = tokens.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1]).expand(-1, k)], dim=1)
        pos = self.next_pos[:, None] + torch.arange(k, device=self.device)
        if self._limit is not None:
            pos = pos.clamp(max=self._limit - 1)
        logits = self._forward(tokens, pos, k)
        self.next_pos = self.next_pos + k
        return self._unstack(logits)

    def rollback(self, fed: int, kept: torch.Tensor) -> None:
        """Forget all but the first ``kept[r]`` (``[B]``) of the last ``fed`` tokens of each prompt, in every
        group (:meth:`ModelRunner.rollback`'s rule)."""
        if fed:
            self.mask, self.next_pos = forget_tail(self.mask, self.next_pos, self.cache, fed,
                                                   self._stack(kept.to(self.device)))

    def select(self, rows: torch.Tensor) -> None:
        """Keep only prompts ``rows`` (int64 indices into the current ``B``), in that order, in every group:
        the cache's batch dimension by ``index_select``."""
        rows = rows.to(self.device)
        stacked = (torch.arange(self.groups, device=self.device)[:, None] * self.batch + rows[None, :]).reshape(-1)
        self.mask = self.mask[stacked]
        self.next_pos = self.next_pos[stacked]
        if self.cache is not None:
            self.cache.batch_select_indices(stacked)
        self.batch = int(rows.shape[0])

    @torch.inference_mode()
    def score_logits(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> StackedLogits:
        """The logits of the last ``keep`` positions of a left-padded batch ``[B, L]``, no cache:
        ``stacked [n + 1, B, keep, W]`` (``ProxyTuner.score``'s per-member call, all pairs at once)."""
        self.batch = int(ids.shape[0])
        ids = self._stack(to_device(ids, self.device))
        mask = self._stack(to_device(mask, self.device))
        extra = {"logits_to_keep": keep} if self._keep_one else {}
        out = self._call(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False, **extra)
        return self._unstack(out.logits[:, -keep:])

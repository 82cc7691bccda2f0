"""LoRA experts: a PEFT adapter and its base model as one pair, run as one stacked forward over shared weights.

Proxy-tuning with a LoRA adapter needs no second small model: the expert is base + adapter and the
anti-expert is exactly the adapter's base. This module holds the two halves of that (issue 25's groundwork;
the ensemble member that uses them comes with the engine wiring):

**Reading and checking an adapter** (:func:`read_adapter`, :func:`check_adapter`). An adapter is a directory
with ``adapter_config.json`` (a LoRA config) and ``adapter_model.safetensors`` (pickled ``.bin`` weights are
refused, as every model proxytune loads is safetensors only), or an adapter already loaded in a
``peft.PeftModel``. Each error names the argument it is about (``expert_adapter``, ``anti_expert``).

*Which anti-expert is the adapter's base* (:func:`check_base`), in this order:

1. the adapter records no base (``base_model_name_or_path`` empty): the named anti-expert is taken as its base
   (the shape checks below still hold);
2. the recorded base and the named anti-expert are the same source: the same text, or both existing
   directories with the same resolved real path. A relative recorded path is read relative to the adapter's
   directory first (a shipped adapter records its sibling base as ``../small-base``), then to the current one;
3. otherwise the recorded base must be found on this machine (a directory, or a hub id in the local Hugging
   Face cache; nothing is downloaded) and equal the anti-expert by **config and weights**: the same
   ``model_type``, vocabulary size and layer shapes, and the same :func:`weight_fingerprint` (SHA-256 over
   every weight's name, shape and values cast to fp32, tied copies counted once: an fp16 file and the same
   weights loaded in fp32 agree, a fine-tuned copy does not). Hashing reads every weight once;
4. a recorded base that is neither the same source nor found here is an error that says so (name the
   recorded base as the anti-expert, or point the adapter's ``base_model_name_or_path`` at the local copy).

An adapter inside a loaded ``PeftModel`` has its base in hand: a named anti-expert must have its fingerprint.

*Architecture and vocabulary* (:func:`check_architecture`): every module the adapter adapts must exist in the
anti-expert with the shapes the adapter's matrices need (``lora_A [r, in]``, ``lora_B [out, r]``); an
adapted or saved embedding or output layer must have the anti-expert's vocabulary; a recorded base found here
must have the anti-expert's ``model_type`` and ``vocab_size``.

**The stacked forward** (:func:`stack_adapters`, :class:`StackedAdapterRunner`). One ``PeftModel`` holds
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
embedding or a LoRA variant (DoRA, aLoRA, ...) runs "peft".

Results equal, within fp32 rounding, an expert made by ``merge_and_unload()`` on a copy of the base with the
untouched base as anti-expert (tests/test_adapters.py). ``peft`` is the ``lora`` extra; it is imported only here,
and only when an adapter is used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from proxytune.engine.loading import ModelLoadError
from proxytune.engine.prompts import position_ids
from proxytune.engine.runner import cache_argument, forward_parameters, position_limit, to_device

__all__ = ["AdapterError", "Adapter", "read_adapter", "recorded_base_path", "check_base", "check_architecture",
           "check_adapter", "weight_fingerprint", "stack_adapters", "StackedLogits", "StackedAdapterRunner",
           "BASE_ROWS", "require_peft", "GroupSlices", "slices_apply"]

BASE_ROWS = "__base__"  # PEFT's name for rows that skip every adapter
_CONFIG = "adapter_config.json"
_WEIGHTS = "adapter_model.safetensors"
_PICKLED = "adapter_model.bin"
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads")  # fmt: skip


class AdapterError(ModelLoadError):
    """An adapter that cannot be used as given (the message names the argument)."""


def require_peft(argument: str = "expert_adapter"):
    """``peft``, or a clear error saying how to get it."""
    try:
        import peft
    except ImportError as e:
        raise AdapterError(f"{argument}: LoRA adapters need PEFT: pip install 'proxytune[lora]' (or pip install peft)") from e
    return peft


@dataclass
class Adapter:
    """One LoRA adapter, read and not yet attached: where it came from, its config (a dict, as saved), its
    weights (``name -> tensor``, PEFT's saved names) and its recorded base. ``peft_model``/``peft_name`` are set
    for an adapter that was given inside a loaded ``PeftModel``."""

    source: str
    argument: str
    config: dict
    weights: dict = field(repr=False)
    directory: Optional[str] = None
    peft_model: Any = field(default=None, repr=False)
    peft_name: Optional[str] = None

    @property
    def recorded_base(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path") or None

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 0))


def read_adapter(source: Union[str, os.PathLike, Any], argument: str = "expert_adapter",
                 adapter_name: Optional[str] = None) -> Adapter:  # fmt: skip
    """Read an adapter from a directory (``adapter_config.json`` + ``adapter_model.safetensors``) or take one
    from a loaded ``peft.PeftModel`` (its ``adapter_name``, or its active adapter). Only LoRA adapters."""
    if not isinstance(source, (str, os.PathLike)):
        return _from_peft_model(source, argument, adapter_name)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        raise AdapterError(f"{argument}: no such adapter directory: {text}")
    if not path.is_dir():
        raise AdapterError(f"{argument}: {text} is a file; give the adapter's directory (with {_CONFIG})")
    if not (path / _CONFIG).is_file():
        raise AdapterError(f"{argument}: {text} has no {_CONFIG}; is it a PEFT adapter directory?")
    if not (path / _WEIGHTS).is_file():
        if (path / _PICKLED).is_file():
            raise AdapterError(f"{argument}: {text} has only {_PICKLED} (pickled weights can run code and are not "
                               f"loaded); save the adapter with safe_serialization=True ({_WEIGHTS})")  # fmt: skip
        raise AdapterError(f"{argument}: {text} has no {_WEIGHTS} (the adapter's weights are missing)")
    try:
        with open(path / _CONFIG) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{argument}: cannot read {path / _CONFIG}: {e}") from e
    _check_lora(config, argument, text)
    from safetensors.torch import load_file

    try:
        weights = load_file(str(path / _WEIGHTS))
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error types
        raise AdapterError(f"{argument}: cannot read {path / _WEIGHTS}: {e}") from e
    if not any(".lora_" in k for k in weights):
        raise AdapterError(f"{argument}: {path / _WEIGHTS} holds no LoRA weights")
    return Adapter(text, argument, config, weights, directory=str(path.resolve()))


def _check_lora(config: dict, argument: str, where: str) -> None:
    kind = config.get("peft_type") or ""
    kind = str(getattr(kind, "value", kind)).upper()  # an enum in a loaded config, a string in a saved one
    if kind != "LORA":
        raise AdapterError(f"{argument}: {where} is a {kind or 'typeless'} adapter; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise AdapterError(f"{argument}: {where} is a DoRA adapter, which PEFT cannot run in a mixed-adapter batch")


def _from_peft_model(model: Any, argument: str, adapter_name: Optional[str]) -> Adapter:
    peft = require_peft(argument)
    if not isinstance(model, peft.PeftModel):
        raise AdapterError(f"{argument}: expected an adapter directory or a peft.PeftModel, got {type(model).__name__}")
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise AdapterError(f"{argument}: the PeftModel has no adapter {name!r} (it has {', '.join(model.peft_config)})")
    config = model.peft_config[name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    _check_lora(config, argument, f"adapter {name!r} of the PeftModel")
    from peft import get_peft_model_state_dict

    weights = get_peft_model_state_dict(model, adapter_name=name)
    return Adapter(f"<PeftModel adapter {name!r}>", argument, config, weights, peft_model=model, peft_name=name)


# ------------------------------------------------------------------------------------------- which base


def recorded_base_path(adapter: Adapter) -> Optional[str]:
    """The adapter's recorded base as a directory on this machine, or None when it is not here. A relative
    path is read relative to the adapter's directory first, then to the current one; a hub id is looked up in
    the local Hugging Face cache only (nothing is downloaded)."""
    text = adapter.recorded_base
    if not text:
        return None
    path = Path(text).expanduser()
    candidates = [path] if path.is_absolute() else [Path(adapter.directory) / path] if adapter.directory else []
    candidates.append(path)
    for c in candidates:
        if c.is_dir() and (c / "config.json").is_file():
            return str(c.resolve())
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            found = snapshot_download(text, local_files_only=True)
            if (Path(found) / "config.json").is_file():
                return found
        except Exception:  # not in the cache (or no hub client): the base is not here
            return None
    return None


def _same_source(adapter: Adapter, anti_source: Optional[str]) -> bool:
    if not anti_source or not adapter.recorded_base:
        return False
    if anti_source == adapter.recorded_base:
        return True
    here = recorded_base_path(adapter)
    anti = Path(anti_source).expanduser()
    return here is not None and anti.is_dir() and os.path.realpath(anti) == os.path.realpath(here)


def weight_fingerprint(weights: Union[str, os.PathLike, torch.nn.Module]) -> str:
    """SHA-256 over a model's weights: each tensor's name, shape and values cast to fp32, in name order; tied
    copies (the same storage under two names, as a tied output layer) counted once under the first name.
    ``weights`` is a model directory (its ``*.safetensors``), a ``PreTrainedModel``, or the base inside a
    ``PeftModel`` (its LoRA tensors are left out and PEFT's wrapper names mapped back)."""
    h = hashlib.sha256()
    for name, t in sorted(_named_base_weights(weights)):
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _named_base_weights(weights) -> list:
    if isinstance(weights, (str, os.PathLike)):
        from safetensors import safe_open

        out = []
        files = sorted(Path(weights).glob("*.safetensors"))
        if not files:
            raise AdapterError(f"{weights} has no safetensors weights to compare")
        for f in files:
            with safe_open(str(f), "pt") as st:
                out += [(k, st.get_tensor(k)) for k in st.keys()]
        return out
    module = weights
    if hasattr(module, "get_base_model") and hasattr(module, "peft_config"):
        module = module.get_base_model()
    out, seen = [], set()
    for name, t in module.state_dict(keep_vars=True).items():
        if ".lora_" in name or "modules_to_save" in name:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out.append((name.replace(".base_layer.", ".").replace(".original_module.", "."), t))
    return out


def _config_of(module_or_dir) -> dict:
    if isinstance(module_or_dir, (str, os.PathLike)):
        with open(Path(module_or_dir) / "config.json") as f:
            cfg = json.load(f)
        cfg = cfg.get("text_config", cfg) if "vocab_size" not in cfg else cfg
        return {k: cfg.get(k) for k in _SHAPE_FIELDS}
    module = module_or_dir.get_base_model() if hasattr(module_or_dir, "get_base_model") else module_or_dir
    cfg = module.config.get_text_config() if hasattr(module.config, "get_text_config") else module.config
    out = {k: getattr(cfg, k, None) for k in _SHAPE_FIELDS}
    out["model_type"] = module.config.model_type
    return out


def check_base(adapter: Adapter, anti_module: Optional[torch.nn.Module], anti_source: Optional[str] = None,
               anti_argument: str = "anti_expert") -> None:  # fmt: skip
    """Raise :class:`AdapterError` unless the anti-expert (``anti_module``, named ``anti_source`` by the user, if
    it was named by a path or id) is the adapter's base, by the rule in the module docstring."""
    where = f"{adapter.argument} {adapter.source}"
    if adapter.peft_model is not None:
        if anti_module is not None and anti_module is not adapter.peft_model.get_base_model():
            if weight_fingerprint(anti_module) != weight_fingerprint(adapter.peft_model):
                raise AdapterError(f"{anti_argument} {anti_source or type(anti_module).__name__} is not the base of "
                                   f"{where}: its weights differ from the PeftModel's base")  # fmt: skip
        return
    if not adapter.recorded_base or _same_source(adapter, anti_source):
        return
    here = recorded_base_path(adapter)
    if here is None:
        raise AdapterError(
            f"{anti_argument} {anti_source or '(a loaded model)'} is not the recorded base of {where}: the adapter "
            f"records {adapter.recorded_base!r}, which is not on this machine to compare with; name it as the "
            f"anti-expert, or point the adapter's base_model_name_or_path at your local copy of it")  # fmt: skip
    if anti_module is None:
        raise AdapterError(f"{anti_argument}: give the anti-expert's model to compare it with the recorded base of {where}")
    mine, theirs = _config_of(here), _config_of(anti_module)
    diff = [k for k in _SHAPE_FIELDS if mine.get(k) is not None and theirs.get(k) is not None and mine[k] != theirs[k]]
    if diff:
        raise AdapterError(f"{anti_argument} {anti_source or '(a loaded model)'} is not the base of {where} "
                           f"({adapter.recorded_base}): config differs in " + ", ".join(
                               f"{k} ({theirs[k]} vs the base's {mine[k]})" for k in diff))  # fmt: skip
    if weight_fingerprint(here) != weight_fingerprint(anti_module):
        raise AdapterError(f"{anti_argument} {anti_source or '(a loaded model)'} is not the base of {where} "
                           f"({adapter.recorded_base}): the same config, but different weights")  # fmt: skip


# --------------------------------------------------------------------------------- architecture, vocabulary


def _target_path(key: str) -> Optional[tuple[str, str]]:
    """``(module path in the base model, matrix kind)`` of a saved LoRA tensor name, or None."""
    for kind in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        marker = f".{kind}"
        if marker in key:
            path = key.split(marker)[0]
            for prefix in ("base_model.model.",):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            return path, kind
    return None


def check_architecture(adapter: Adapter, anti_module: torch.nn.Module, anti_argument: str = "anti_expert") -> None:
    """Raise :class:`AdapterError` unless every tensor of ``adapter`` fits ``anti_module`` (module names, matrix
    shapes, vocabulary; see the module docstring)."""
    base = anti_module.get_base_model() if hasattr(anti_module, "get_base_model") else anti_module
    where = f"{adapter.argument} {adapter.source}"
    vocab = int(base.get_input_embeddings().weight.shape[0])
    here = recorded_base_path(adapter) if adapter.peft_model is None else None
    if here is not None:
        mine, theirs = _config_of(here), _config_of(base)
        if mine.get("model_type") and theirs.get("model_type") and mine["model_type"] != theirs["model_type"]:
            raise AdapterError(f"{where} is for another architecture: its base {adapter.recorded_base} is a "
                               f"{mine['model_type']} model, {anti_argument} a {theirs['model_type']} one")  # fmt: skip
        if mine.get("vocab_size") and mine["vocab_size"] != theirs.get("vocab_size"):
            raise AdapterError(f"{where} is for another vocabulary: its base has {mine['vocab_size']} tokens, "
                               f"{anti_argument} {theirs.get('vocab_size')}")  # fmt: skip
    for key, t in adapter.weights.items():
        found = _target_path(key)
        if found is None:  # a saved whole module (modules_to_save): it must fit as it is
            path = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
            path = path.replace(".base_layer.", ".")  # a whole layer PEFT saved beside its adapter (an embedding)
            try:
                own = base.get_parameter(path)
            except AttributeError:
                raise AdapterError(f"{where} is for another architecture: it saves {path}, "
                                   f"which {anti_argument} lacks") from None  # fmt: skip
            if tuple(own.shape) != tuple(t.shape):
                what = "vocabulary" if vocab in tuple(t.shape) or vocab in tuple(own.shape) else "architecture"
                raise AdapterError(f"{where} is for another {what}: {path} is {tuple(t.shape)} in the adapter, "
                                   f"{tuple(own.shape)} in {anti_argument}")  # fmt: skip
            continue
        path, kind = found
        path = path.replace(".base_layer", "")
        try:
            module = base.get_submodule(path)
        except AttributeError:
            raise AdapterError(f"{where} is for another architecture: it adapts {path}, which {anti_argument} lacks") from None
        if kind.startswith("lora_embedding"):
            rows, dim = module.weight.shape
            need = (adapter.rank, rows) if kind == "lora_embedding_A" else (dim, adapter.rank)
            if tuple(t.shape) != need:
                tokens = kind == "lora_embedding_A"
                theirs, mine = (t.shape[-1], rows) if tokens else (t.shape[0], dim)
                raise AdapterError(f"{where} is for another vocabulary: its {path} adapter is for {theirs} "
                                   f"{'tokens' if tokens else 'features'}, {anti_argument} has {mine}")  # fmt: skip
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            raise AdapterError(f"{where} is for another architecture: {path} in {anti_argument} is not a linear layer")
        if hasattr(module, "in_features"):
            in_f, out_f = module.in_features, module.out_features
        elif type(module).__name__ == "Conv1D":  # GPT-2's layers keep the weight as [in, out]
            in_f, out_f = weight.shape
        else:
            out_f, in_f = weight.shape
        want = t.shape[1] if kind == "lora_A" else t.shape[0]
        have = in_f if kind == "lora_A" else out_f
        if want != have:
            what = "vocabulary" if module is base.get_output_embeddings() else "architecture"
            side = "inputs" if kind == "lora_A" else "outputs"
            raise AdapterError(f"{where} is for another {what}: {path} takes {want} {side} in the adapter, "
                               f"{have} in {anti_argument}")  # fmt: skip


def check_adapter(adapter: Adapter, anti_module: torch.nn.Module, anti_source: Optional[str] = None,
                  anti_argument: str = "anti_expert") -> None:  # fmt: skip
    """Both checks: the anti-expert is the adapter's base (:func:`check_base`), and the adapter fits it
    (:func:`check_architecture`). Architecture first: a shape mismatch is the clearer message."""
    check_architecture(adapter, anti_module, anti_argument)
    check_base(adapter, anti_module, anti_source, anti_argument)


# ---------------------------------------------------------------------------------------- the stacked forward


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
    linear LoRA layer without a variant (DoRA, aLoRA, ...) and without a LoRA bias."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear

    for m in peft_model.modules():
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
                               "LoRA, no DoRA or other variant); use mixed='peft'")  # fmt: skip
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
        if fed == 0:
            return
        kept = self._stack(kept.to(self.device))
        cols = torch.arange(fed, device=self.device)
        tail = (cols[None, :] < kept[:, None]).to(self.mask.dtype)
        self.mask = torch.cat([self.mask[:, :-fed], self.mask[:, -fed:] * tail], dim=1)
        self.next_pos = self.next_pos - (fed - kept)
        drop = fed - int(kept.max())
        if drop > 0:
            self.mask = self.mask[:, :-drop]
            self.cache.crop(-drop)

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

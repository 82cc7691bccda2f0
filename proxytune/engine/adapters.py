"""LoRA experts: a PEFT adapter and its base model as one pair, run as one stacked forward over shared weights.

Proxy-tuning with a LoRA adapter needs no second small model: the expert is base + adapter and the
anti-expert is exactly the adapter's base. This module reads and checks adapters; the stacked forward is
:mod:`proxytune.engine.stacked_adapters`, the ensemble members :mod:`proxytune.engine.adapter_members`, and
``Ensemble.load``'s adapter experts :mod:`proxytune.engine.adapter_experts`.

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

**The stacked forward** lives in :mod:`proxytune.engine.stacked_adapters`.

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
from typing import Any, Optional, Union

import torch

from proxytune.engine.loading import ModelLoadError

__all__ = ["AdapterError", "Adapter", "read_adapter", "recorded_base_path", "check_base", "check_architecture",
           "check_adapter", "weight_fingerprint", "BASE_ROWS", "require_peft"]

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

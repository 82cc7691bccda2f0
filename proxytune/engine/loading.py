"""Loading the models and their tokenizers: hub ids, local directories or model objects, per-model dtype/device.

Nothing here imports transformers at module level; ``import proxytune`` stays fast.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from proxytune.engine.members import LocalModel, logits_width

if TYPE_CHECKING:
    from proxytune.engine.prompts import PromptTemplate

__all__ = ["ModelSpec", "ModelLoadError", "LocalModel", "LoadedModel", "check_device", "check_spec", "load_model", "load_tokenizer",
           "parse_dtype", "resolve_source", "hub_kwargs", "hub_hint", "own_tokenizer", "has_tokenizer_files"]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or loaded (missing path, unknown hub id, no safetensors)."""


@dataclass
class ModelSpec:
    """One model of the ensemble with its own settings.

    Parameters
    ----------
    model : str, os.PathLike or transformers.PreTrainedModel
        A hub id (``"org/name"``), a local directory, or an already-loaded causal LM. None for an adapter.
    adapter : str, os.PathLike, peft.PeftModel or :class:`~proxytune.engine.adapters.Adapter`, optional
        An expert given as a LoRA adapter (a PEFT directory with ``adapter_config.json`` and
        ``adapter_model.safetensors``, or a loaded ``PeftModel``'s active adapter) instead of ``model``: the pair
        is the adapter's base with and without the adapter, run as one stacked forward (``docs/lora.md``). Its
        anti-expert is the entry at the same index of ``anti_experts``, or None: the adapter's recorded base
        found on this machine. Experts only; ``dtype`` and ``device`` apply to the base model when the
        anti-expert names none; no ``template`` or ``tokenizer`` (the pair shares its base's prompt ids).
    dtype : torch.dtype or str, optional
        ``"float32"``, ``"bfloat16"``, ``"float16"`` (or a torch dtype). Default: the tuner's ``dtype``.
    device : str or torch.device, optional
        Where this model runs (a large base may sit on another device than the small models).
    template : None, "chat", a string containing ``{prompt}``, or :class:`PromptTemplate`
        How this model sees each prompt: raw (None), wrapped in its tokenizer's chat template, or wrapped in
        the given prefix/suffix. Token ids are spliced, never re-tokenised from decoded text.
    tokenizer : str, os.PathLike or tokenizer, optional
        This model's own tokenizer (for the vocabulary check and its chat template). Default: loaded from the
        model's directory or hub id; none for a model object that does not come from a local directory.
    """

    model: Any = None
    dtype: Union[torch.dtype, str, None] = None
    device: Union[str, torch.device, None] = None
    template: Union[None, str, "PromptTemplate"] = None
    tokenizer: Any = None
    adapter: Any = None


LoadedModel = LocalModel  # the name before members.py: a local Hugging Face model


def parse_dtype(dtype: Union[torch.dtype, str, None], name: str = "dtype") -> Optional[torch.dtype]:
    """None, or one of the dtypes the models may run in (float32, bfloat16, float16), given by name or as a
    ``torch.dtype``: the same rule for both (float64 logits are not an op input; the op would refuse them late)."""
    if dtype is None or dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"{name} must be one of {sorted(set(_DTYPES))} (or that torch.dtype), got {dtype!r}")


def check_device(device: Union[str, torch.device, None], name: str = "device") -> Optional[torch.device]:
    """``torch.device(device)`` for a device models can run on here, None as None; a meta device (shapes
    without data) and CUDA on a machine without it are refused up front, naming ``name``."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"{name}: not a device: {device!r} ({e})") from None
    if dev.type == "meta":
        raise ValueError(f"{name}: device meta holds no data (shapes only): models cannot run on it; give cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: device {device} requested but CUDA is not available here")
    return dev


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                    "vocab.txt", "merges.txt")  # fmt: skip


def resolve_source(source: Union[str, os.PathLike], what: str) -> str:
    """A local directory, or a hub id (``org/name`` or a canonical ``name`` such as ``gpt2``); a path that
    does not exist is a clear error, not a hub lookup."""
    text = os.fspath(source)
    if not text.strip():
        raise ModelLoadError(f"{what}: the model path or hub id is empty")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{what}: {text} is a file; give the model's directory (with config.json)")
        if not (path / "config.json").exists() and what != "tokenizer":
            raise ModelLoadError(f"{what}: {text} has no config.json; is it a Hugging Face model directory?")
        return str(path)
    looks_like_path = not _HUB_ID.fullmatch(text) or ".." in text or os.sep != "/" and os.sep in text
    if looks_like_path or "/" in text and path.parent.is_dir():  # "models/x" next to an existing models/: a path
        raise ModelLoadError(f"{what}: no such directory: {text}")
    return text  # a hub id: transformers resolves it (from its cache when offline)


_reachable: dict[str, bool] = {}


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout`` seconds (asked once per
    process). Without it, transformers spends half a minute in retries before it says the hub is offline."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if endpoint not in _reachable:
        import socket
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)), timeout).close()
            _reachable[endpoint] = True
        except OSError:
            _reachable[endpoint] = False
    return _reachable[endpoint]


def hub_kwargs(source: str) -> dict:
    """``local_files_only=True`` for a hub id when offline (``HF_HUB_OFFLINE=1``) or the hub is unreachable,
    so a missing model fails at once; nothing for a local directory."""
    if Path(source).is_dir():
        return {}
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return {"local_files_only": True} if offline or not _hub_reachable() else {}


def has_tokenizer_files(source: str) -> bool:
    """Whether ``source`` may hold a tokenizer: a hub id (asked when loading), or a directory with tokenizer files."""
    return not Path(source).is_dir() or any((Path(source) / f).exists() for f in _TOKENIZER_FILES)


def hub_hint(source: str, kwargs: dict) -> str:
    if not kwargs.get("local_files_only"):
        return ""
    return (
        f" ({source} is not a local directory and, offline or with the hub unreachable, only the local Hugging "
        "Face cache is searched: download it where there is a network, or give a local directory)"
    )


def check_spec(spec: ModelSpec, name: str) -> None:
    """The cheap checks of one spec (paths exist, dtype and device make sense), run for every model before
    the slow loading starts, so a typo in the last path fails at once. (An expert's ``adapter=`` spec is
    checked by :func:`proxytune.engine.adapter_experts.plan_adapter_pair`.)"""
    if spec.adapter is not None:
        raise ModelLoadError(f"{name}: adapter= is for experts only (a LoRA adapter's base is its anti-expert)")
    if spec.model is None:
        raise ModelLoadError(f"{name}: no model given (a hub id, a directory or a PreTrainedModel)")
    if isinstance(spec.model, (str, os.PathLike)):
        resolve_source(spec.model, name)
    parse_dtype(spec.dtype, f"{name}: dtype")
    check_device(spec.device, f"{name}: device")


@contextlib.contextmanager
def _progress_bars(show: bool):
    """transformers' own progress bars ("Loading weights") on or off for the duration."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if show else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def load_model(
    spec: ModelSpec, name: str, *, dtype: Optional[torch.dtype], device: Optional[torch.device], trust_remote_code: bool,
    progress: bool = True,
) -> LocalModel:
    """Load (or adopt) one model: eval mode, on its device, in its dtype; ``progress`` shows transformers'
    loading bars."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    dtype = parse_dtype(spec.dtype) or dtype
    device = torch.device(spec.device) if spec.device is not None else device
    if device is None:  # a model object stays where it is; a loaded one goes to the GPU if there is one
        device = spec.model.device if isinstance(spec.model, PreTrainedModel) else default_device()
    check_device(device, f"{name}: device")  # a model object may sit on the meta device: refused here
    if isinstance(spec.model, PreTrainedModel):  # moved in place (nn.Module.to), like any .to()
        module, source = spec.model, getattr(spec.model, "name_or_path", "") or f"<{type(spec.model).__name__}>"
        module = module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)
    elif isinstance(spec.model, (str, os.PathLike)):
        source = resolve_source(spec.model, name)
        dtype = dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        hub = hub_kwargs(source)
        try:
            with _progress_bars(progress):
                module = AutoModelForCausalLM.from_pretrained(
                    source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **hub
                )
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights that do not fit the config
            message = str(e).split("\n\t")[0].strip()  # torch's size-mismatch report: its first lines
            raise ModelLoadError(f"{name}: cannot load a causal LM from {source!r}: {message}{hub_hint(source, hub)}") from e
        module = module.to(device)
    else:
        raise TypeError(f"{name} must be a hub id, a directory or a PreTrainedModel, got {type(spec.model).__name__}")
    module.eval()
    width = logits_width(module)
    tokenizer = spec.tokenizer
    if tokenizer is None:
        local = source if isinstance(spec.model, (str, os.PathLike)) else None
        if local is None and source and Path(source).is_dir():
            local = source
        tokenizer = own_tokenizer(local, name, trust_remote_code) if local else None
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
    from proxytune.engine.prompts import PromptTemplate

    return LocalModel(name, module, device, width, tokenizer, PromptTemplate.parse(spec.template), str(source))


def own_tokenizer(source: str, name: str, trust_remote_code: bool):
    """The tokenizer that comes with a model, for the vocabulary check: None where the model has none (a
    directory without tokenizer files, a hub model without one); a tokenizer that is there but does not load
    (a corrupt tokenizer.json) is an error, never a skipped check."""
    if not has_tokenizer_files(source):
        return None
    try:
        return load_tokenizer(source, trust_remote_code=trust_remote_code, what=f"{name}'s tokenizer")
    except ModelLoadError:
        if Path(source).is_dir():
            raise
        return None  # a hub model without a tokenizer of its own


def load_tokenizer(source: Union[str, os.PathLike], *, trust_remote_code: bool = False, what: str = "tokenizer"):
    from transformers import AutoTokenizer

    source = resolve_source(source, "tokenizer")
    hub = hub_kwargs(source)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    except Exception as e:  # tokenizers raises its own exception types for a corrupt file
        raise ModelLoadError(f"{what}: cannot load a tokenizer from {source!r}: {e}{hub_hint(source, hub)}") from e

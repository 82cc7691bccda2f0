"""The registry of op backends and the rule ``backend="auto"`` follows: a leaf module.

A backend computes :func:`proxytune.sample` and :func:`proxytune.combine` from normalised
:class:`~proxytune._args.SampleArgs`. Each adapter module registers its backend here when it is imported
(``_reference_backend``, ``_cpu_backend``, ``_triton_backend``; :mod:`proxytune.ops` imports them); this
module imports none of them. ``auto`` takes, for the logits' device type, the registered backend with the
highest priority that is available; when a preferred one is unavailable it warns once and falls back. An
explicitly named backend that is unavailable, or does not serve the device, raises.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from proxytune._args import SampleArgs

__all__ = ["Backend", "BackendUnavailableError", "register", "resolve", "names", "get"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no device, or wrong device type)."""


DeviceTypes = Union[tuple[str, ...], Callable[[], tuple[str, ...]]]


@dataclass(frozen=True)
class Backend:
    name: str
    # Device types it serves ("cpu", "cuda", ...; "*" serves any), or a function giving them when asked (the
    # triton backend serves CPU tensors only while triton's interpreter is on).
    device_types: DeviceTypes
    priority: int  # auto picks the highest available
    sample: Callable[[SampleArgs], tuple[torch.Tensor, torch.Tensor]]  # -> (ids int64 [B], logprobs fp32 [B])
    combine: Callable[[SampleArgs], torch.Tensor]  # -> fp32 [B, V]
    why_unavailable: Callable[[], Optional[str]] = lambda: None  # None when usable
    auto_device_types: Optional[DeviceTypes] = None  # where auto may pick it; default device_types

    def types(self, auto: bool = False) -> tuple[str, ...]:
        """The device types it serves now (for ``auto``, where auto may pick it)."""
        types = self.auto_device_types if auto and self.auto_device_types is not None else self.device_types
        return types() if callable(types) else types

    def serves(self, device: torch.device, auto: bool = False) -> bool:
        types = self.types(auto)
        return "*" in types or device.type in types


_REGISTRY: dict[str, Backend] = {}
_warned: set[str] = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    """Registered backend names, best first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


def get(name: str) -> Backend:
    """The registered backend ``name`` as it is (available or not: see ``why_unavailable``)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {names()}")
    return _REGISTRY[name]


_resolved: dict[tuple[str, torch.device], tuple[Backend, tuple[int, ...], tuple[str, ...]]] = {}


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to run for ``name`` (a registered name or ``"auto"``) on ``device``.

    Remembered per ``(name, device)``: the op calls this on every step. A remembered answer stands while
    the registry holds the same backends (by identity: registering or replacing one, also by assignment,
    invalidates it) and the chosen one serves the same device types; failures are not remembered.
    """
    hit = _resolved.get((name, device))
    registered = tuple(map(id, _REGISTRY.values()))
    if hit is not None and hit[1] == registered and hit[2] == hit[0].types():
        return hit[0]
    backend = _resolve(name, device)
    _resolved[name, device] = (backend, registered, backend.types())
    return backend


def _resolve(name: str, device: torch.device) -> Backend:
    if name == "auto":
        for backend in sorted(_REGISTRY.values(), key=lambda b: -b.priority):
            if not backend.serves(device, auto=True):
                continue
            reason = backend.why_unavailable()
            if reason is None:
                return backend
            if backend.name not in _warned:
                _warned.add(backend.name)
                warnings.warn(f"proxytune: backend {backend.name!r} unavailable ({reason}); falling back", stacklevel=3)
        raise BackendUnavailableError(f"no proxytune backend serves device {device}")  # reference serves all
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {names()}")
    backend = _REGISTRY[name]
    if not backend.serves(device):
        raise BackendUnavailableError(
            f"backend {name!r} runs on {', '.join(backend.types())} tensors, but the logits are on {device}"
        )
    reason = backend.why_unavailable()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return backend

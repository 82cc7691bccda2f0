"""The registry of op backends and the rule ``backend="auto"`` follows.

A backend computes :func:`proxytune.sample` and :func:`proxytune.combine` from normalised
:class:`~proxytune._args.SampleArgs`. ``auto`` takes, for the logits' device type, the registered backend
with the highest priority that is available; when a preferred one is unavailable it warns once and falls
back. An explicitly named backend that is unavailable, or does not serve the device, raises.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from proxytune._args import SampleArgs
from proxytune.reference import combine_reference, sample_reference

__all__ = ["Backend", "BackendUnavailableError", "register", "resolve", "names"]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (not built, no device, or wrong device type)."""


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]  # device types it serves ("cpu", "cuda", ...); "*" serves any
    priority: int  # auto picks the highest available
    sample: Callable[[SampleArgs], tuple[torch.Tensor, torch.Tensor]]  # -> (ids int64 [B], logprobs fp32 [B])
    combine: Callable[[SampleArgs], torch.Tensor]  # -> fp32 [B, V]
    why_unavailable: Callable[[], Optional[str]] = lambda: None  # None when usable
    auto_device_types: Optional[tuple[str, ...]] = None  # where auto may pick it; default device_types

    def serves(self, device: torch.device, auto: bool = False) -> bool:
        types = self.auto_device_types if auto and self.auto_device_types is not None else self.device_types
        return "*" in types or device.type in types


_REGISTRY: dict[str, Backend] = {}
_warned: set[str] = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def names() -> list[str]:
    """Registered backend names, best first."""
    return [b.name for b in sorted(_REGISTRY.values(), key=lambda b: -b.priority)]


_resolved: dict[tuple[str, torch.device], tuple[Backend, int]] = {}


def resolve(name: str, device: torch.device) -> Backend:
    """The backend to run for ``name`` (a registered name or ``"auto"``) on ``device``.

    Remembered per ``(name, device)``: the op calls this on every step. A remembered answer stands while
    its backend is still the registered one under its name and the registry has not grown; failures are not
    remembered.
    """
    hit = _resolved.get((name, device))
    if hit is not None and _REGISTRY.get(hit[0].name) is hit[0] and hit[1] == len(_REGISTRY):
        return hit[0]
    backend = _resolve(name, device)
    _resolved[name, device] = (backend, len(_REGISTRY))
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
            f"backend {name!r} runs on {', '.join(backend.device_types)} tensors, but the logits are on {device}"
        )
    reason = backend.why_unavailable()
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is unavailable: {reason}")
    return backend


def _reference_sample(args: SampleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_reference(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size,
    )  # fmt: skip


def _reference_combine(args: SampleArgs) -> torch.Tensor:
    return combine_reference(args.base, args.experts, args.anti_experts, args.weights, args.vocab_size)


register(Backend("reference", ("*",), 0, _reference_sample, _reference_combine))

from proxytune._triton_backend import make_backend as _make_triton_backend  # noqa: E402  (after Backend exists)

register(_make_triton_backend())

from proxytune import _cpu_backend  # noqa: E402  (the C++ extension loads lazily, on first use)

register(
    Backend("cpu", ("cpu",), 10, _cpu_backend.sample_cpu, _cpu_backend.combine_cpu, _cpu_backend.why_unavailable)
)

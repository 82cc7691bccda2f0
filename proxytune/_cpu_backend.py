"""The ``cpu`` backend: the C++ implementation in ``csrc/`` (``torch.ops.proxytune.sample`` / ``combine``).

proxytune calls the same C++ functions through the extension module's direct bindings
(``proxytune._C.sample`` / ``combine``), which skip the dispatcher's argument boxing; other stacks can use
the registered ``torch.ops`` ops.

The extension ``proxytune._C`` comes from ``setup.py`` when torch is importable at install time (an
editable or ``--no-build-isolation`` install). A plain ``pip install .`` builds without torch and ships the
sources instead: the first use then builds them once against the installed torch, into a per-user cache
(:mod:`proxytune._cpu_build`, one line on standard error). ``import proxytune`` loads an extension that is
already built (so ``torch.ops.proxytune.*`` exist from then on) but never builds one. Same function as
:mod:`proxytune.reference` (see ``docs/semantics.md``).

Host syncs: none beyond the op itself (CPU tensors only). Registered with :mod:`proxytune.backends` at import.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from proxytune import _cpu_build, backends
from proxytune._args import SampleArgs

__all__ = ["why_unavailable", "load_if_built", "sample_cpu", "combine_cpu", "BACKEND"]

_state: dict[str, Optional[str]] = {}
_ext = None  # the loaded proxytune._C module


def _load(allow_build: bool) -> Optional[str]:
    """Load ``proxytune._C`` (installed, else cached, else built now if ``allow_build``): None on success,
    else the reason it is unavailable and what to do."""
    global _ext
    try:
        try:
            import proxytune._C as ext  # registers torch.ops.proxytune.*
        except ImportError as missing:
            path = _cpu_build.cached_library()
            if path is None and not allow_build:
                return (
                    f"the C++ extension proxytune._C is not built ({missing}); unset PROXYTUNE_NO_BUILD to build it "
                    "on first use, or install with `pip install --no-build-isolation .` where torch is installed"
                )
            ext = _cpu_build.load(path or _cpu_build.build())
        torch.ops.proxytune.sample  # noqa: B018  (raises if the library did not register the op)
        ext.sample  # noqa: B018  (an extension built before the direct bindings lacks them)
    except _cpu_build.BuildError as exc:
        return f"the C++ extension proxytune._C is not built and cannot be built here: {exc}"
    except (ImportError, OSError, AttributeError, RuntimeError) as exc:
        return (
            f"the C++ extension proxytune._C does not load ({exc}); rebuild it (`make setup` in a checkout, "
            "else reinstall proxytune)"
        )
    _ext = ext
    return None


def load_if_built() -> None:
    """At import: load the extension if it is built already (never build); failures are left for later."""
    if "reason" not in _state and _load(allow_build=False) is None:
        _state["reason"] = None


def why_unavailable() -> Optional[str]:
    """None when ``proxytune._C`` loads (building it first if needed and allowed); otherwise why not."""
    if "reason" not in _state:
        _state["reason"] = _load(allow_build=os.environ.get("PROXYTUNE_NO_BUILD", "0") in ("", "0"))
    return _state["reason"]


def _loaded():
    if _ext is None and why_unavailable() is not None:
        raise RuntimeError(_state["reason"])
    return _ext


def sample_cpu(args: SampleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_ids int64 [B], logprobs fp32 [B])`` computed by the C++ op; the host's batch flags go with
    them (``filters`` bits from :attr:`SampleArgs.filters_on`, ``logprobs``), so it skips the unused work."""
    return (_ext or _loaded()).sample(*args.op_arguments(), args.filter_bits(), args.logprobs)


def combine_cpu(args: SampleArgs) -> torch.Tensor:
    """The fp32 combined logits ``[B, V]`` computed by the C++ op."""
    return (_ext or _loaded()).combine(*args.combine_arguments())


BACKEND = backends.Backend("cpu", ("cpu",), 10, sample_cpu, combine_cpu, why_unavailable)
backends.register(BACKEND)

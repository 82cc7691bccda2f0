"""The ``cpu`` backend: the C++ implementation in ``csrc/`` (``torch.ops.proxytune.sample`` / ``combine``).

proxytune calls the same C++ functions through the extension module's direct bindings
(``proxytune._C.sample`` / ``combine``), which skip the dispatcher's argument boxing; other stacks can use
the registered ``torch.ops`` ops.

The extension ``proxytune._C`` is optional: it is built by ``setup.py`` when torch is importable at build
time. It is loaded lazily, on the first use or availability check, so importing proxytune stays cheap and
never fails because of it. Same function as :mod:`proxytune.reference` (see ``docs/semantics.md``).

Host syncs: none beyond the op itself (CPU tensors only).
"""

from __future__ import annotations

from typing import Optional

import torch

from proxytune._args import SampleArgs

__all__ = ["why_unavailable", "sample_cpu", "combine_cpu"]

BUILD_HINT = (
    "build the C++ extension with `make setup` or `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace` in a checkout)"
)

_state: dict[str, Optional[str]] = {}
_ext = None  # the loaded proxytune._C module


def why_unavailable() -> Optional[str]:
    """None when ``proxytune._C`` loads and registers its ops; otherwise the reason and how to build it."""
    global _ext
    if "reason" not in _state:
        try:
            import proxytune._C as ext  # registers torch.ops.proxytune.*

            torch.ops.proxytune.sample  # noqa: B018  (raises if the library did not register the op)
            ext.sample  # noqa: B018  (an extension built before the direct bindings lacks them)
            _ext = ext
            _state["reason"] = None
        except (ImportError, OSError, AttributeError, RuntimeError) as exc:
            _state["reason"] = f"the C++ extension proxytune._C is not available ({exc}); {BUILD_HINT}"
    return _state["reason"]


def _loaded():
    if _ext is None and why_unavailable() is not None:
        raise RuntimeError(_state["reason"])
    return _ext


def sample_cpu(args: SampleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(token_ids int64 [B], logprobs fp32 [B])`` computed by the C++ op."""
    return (_ext or _loaded()).sample(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k,
        args.top_p, args.min_p, args.seed, args.step, args.vocab_size,
    )  # fmt: skip


def combine_cpu(args: SampleArgs) -> torch.Tensor:
    """The fp32 combined logits ``[B, V]`` computed by the C++ op."""
    return (_ext or _loaded()).combine(args.base, args.experts, args.anti_experts, args.weights, args.vocab_size)

"""The ``triton`` backend: the fused one-launch sampler of :mod:`proxytune.kernels` behind the backend API.

Serves CUDA tensors (``auto`` picks it there once a GPU run has verified it: :mod:`proxytune._verified`);
serves CPU tensors only while triton runs in its numpy interpreter (``TRITON_INTERPRET=1``, read each time
the backend is resolved), which is how the default test suite checks it on machines without a GPU. Importing this module imports neither triton nor the kernels and touches no GPU: the kernels module
is imported on first use (triton reads ``TRITON_INTERPRET`` when it decorates the kernels).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from proxytune import backends
from proxytune._args import SampleArgs
from proxytune._verified import GPU_VERIFIED
from proxytune.reference import combine_reference

__all__ = ["make_backend", "interpreting", "BACKEND"]


def interpreting() -> bool:
    """True when triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _why_unavailable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU (CPU tensors need TRITON_INTERPRET=1, triton's interpreter)"
    return None


def _sample(args: SampleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    from proxytune.kernels.launch import proxy_sample

    has_top_k, has_top_p, has_min_p = args.filters_on  # filters off in every row are compiled out
    return proxy_sample(*args.op_arguments(), has_top_k=has_top_k, has_top_p=has_top_p, has_min_p=has_min_p,
                        write_logprobs=args.logprobs)  # fmt: skip


def _combine(args: SampleArgs) -> torch.Tensor:
    # The combination alone is one elementwise expression; the fused kernel never materialises it.
    return combine_reference(*args.combine_arguments())


def _device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def make_backend() -> backends.Backend:
    """The backend record: serves CUDA tensors, and CPU tensors while the interpreter is on (read when the
    backend is resolved); ``auto`` picks it on CUDA only once a GPU run has verified it
    (:mod:`proxytune._verified`)."""
    auto = ("cuda",) if GPU_VERIFIED else ()
    return backends.Backend("triton", _device_types, 20, _sample, _combine, _why_unavailable, auto_device_types=auto)


BACKEND = make_backend()
backends.register(BACKEND)

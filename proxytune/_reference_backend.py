"""The ``reference`` backend: :mod:`proxytune.reference` (the specification, pure PyTorch) on any device.

Registered at import (priority 0: ``auto`` takes it where nothing faster serves the device).
"""

from __future__ import annotations

import torch

from proxytune import backends
from proxytune._args import SampleArgs
from proxytune.reference import combine_reference, sample_reference

__all__ = ["BACKEND"]


def _sample(args: SampleArgs) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_reference(*args.without_unused_filters().op_arguments(), logprobs=args.logprobs)


def _combine(args: SampleArgs) -> torch.Tensor:
    return combine_reference(*args.combine_arguments())


BACKEND = backends.Backend("reference", ("*",), 0, _sample, _combine)
backends.register(BACKEND)

"""The argument rules every entry point shares: pair weights, batch sizes, boolean flags.

One rule, one function: the op's argument checks (``_args``), the engine (``ProxyTuner``, ``score``,
``SamplingParams``), the integrations (Hugging Face, lm-eval, vLLM) and the CLI call these, so one bad value
gets one answer everywhere. A leaf module: it imports nothing from proxytune (and no torch).

Errors: ``TypeError`` for a value of the wrong kind (a bool or a string where a number belongs), ``ValueError``
for a value of the right kind out of range; both name the argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

__all__ = ["MAX_WEIGHT", "check_weight", "check_weights", "check_batch_size", "check_bool", "parse_bool"]

# The largest pair weight |w| (docs/semantics.md, "Weights"). With |w| <= 1e6 the combined score
# base + sum_i w_i (expert_i - anti_i) cannot overflow float32 (3.4e38) unless some logit exceeds ~1e32 in
# magnitude (real models' logits stay below 1e4), so an overflow can never turn the experts' favourite token
# into a masked one; and at |w| = 1e6 the base already weighs less than one part in a million: larger weights
# would change nothing a user can want.
MAX_WEIGHT = 1e6
WEIGHT_RULE = "a finite number with |w| <= 1e6"


def check_weight(value: Any, name: str = "weights") -> float:
    """One pair weight as a float: a real number (not a bool), finite, ``|w| <= MAX_WEIGHT``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {WEIGHT_RULE}, got {value!r} ({type(value).__name__})")
    w = float(value)
    if not (math.isfinite(w) and abs(w) <= MAX_WEIGHT):
        raise ValueError(f"{name} must be {WEIGHT_RULE}, got {value!r}")
    return w


def check_weights(weights: Any, n_pairs: int, name: str = "weights") -> list[float]:
    """The weight of each of ``n_pairs`` (expert, anti-expert) pairs: one number for every pair, or a list or
    tuple of one (for every pair) or ``n_pairs`` numbers, each by :func:`check_weight`. Weights given where
    there is no pair to weigh (``n_pairs == 0``) are an error, never dropped silently (an empty list is none)."""
    if isinstance(weights, (list, tuple)):
        if not weights and not n_pairs:
            return []  # one weight per pair, for no pairs: nothing given
        if len(weights) not in (1, n_pairs):
            raise ValueError(
                f"{name} must be one number for every pair or one per pair ({n_pairs}), got {len(weights)}: {weights!r}"
            )
        ws = [check_weight(w, f"{name}[{i}]" if len(weights) > 1 else name) for i, w in enumerate(weights)]
    else:
        ws = [check_weight(weights, name)]
    if n_pairs == 0:
        raise ValueError(f"{name}={weights!r} given, but there is no (expert, anti-expert) pair to weigh")
    return ws * n_pairs if len(ws) == 1 else ws


def check_batch_size(value: Any, name: str = "batch_size") -> Optional[int]:
    """None (everything in one batch) or a positive integer (not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer (or None: all at once), got {value!r}")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """A Python API flag: ``True`` or ``False`` only (a string such as ``"no"`` is truthy: refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


_TRUE, _FALSE = ("true", "1"), ("false", "0")


def parse_bool(value: Any, name: str) -> bool:
    """A flag that may arrive as text (lm-eval model args, generation kwargs): lm-eval's own convention,
    ``true``/``false`` in any case (which lm-eval turns into bools itself), and 1/0; anything else (``no``,
    ``off``, ``yes``, ``2``) is refused rather than read by Python truthiness."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false (lm-eval's convention; also 1 or 0), got {value!r}")

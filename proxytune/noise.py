"""Counter-based sampling noise: the uniform for (row, token) is a pure function of (seed, step, token).

This module is the executable form of the noise specification in ``docs/semantics.md``; every backend
(reference, C++, Triton) reproduces :func:`uniform` bit for bit.

Construction (all integers unsigned 32-bit, arithmetic mod 2**32):

* key     ``(k0, k1) = (seed mod 2**32, (seed >> 32) mod 2**32)``   (seed as a 64-bit two's complement)
* counter ``(c0, c1, c2, c3) = (token, 0, step mod 2**32, (step >> 32) mod 2**32)``
* ``r = Philox-4x32-10(counter, key)[0]``   (Salmon et al. 2011; the same function as ``tl.philox``)
* ``u = ((r >> 9) + 0.5) * 2**-23``        (23 random bits; exact in fp32; ``0 < u < 1``)
* ``g = -log(-log(u))``                    (Gumbel(0, 1) noise, fp32)

Other streams (speculative decoding's draft, accept and residual draws) take their noise from the same
function under a *derived* seed, :func:`stream_seed`, so they never reuse the op's own noise.

Everything here is plain int64 PyTorch arithmetic (no uint32 dtype needed), so it runs on any device.
"""

from __future__ import annotations

import torch

__all__ = ["philox4x32_10", "uniform", "gumbel", "stream_seed"]

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # Philox-4x32 multipliers
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9  # Weyl key increments (golden ratio, sqrt(3) - 1)
_KEY_B = 0xBB67AE85
_ROUNDS = 10


def _mul_hi_lo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product ``m * x`` for a constant ``m < 2**32`` and int64
    ``x`` holding values in [0, 2**32). Splits x into 16-bit halves so no int64 product overflows."""
    x_hi, x_lo = x >> 16, x & 0xFFFF
    p_hi, p_lo = m * x_hi, m * x_lo  # each < 2**48
    mid = ((p_hi & 0xFFFF) << 16) + p_lo  # < 2**49; bits 0..48 of the product's low part
    lo = mid & _MASK32
    hi = ((p_hi >> 16) + (mid >> 32)) & _MASK32
    return hi, lo


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32 with 10 rounds on broadcastable int64 tensors holding uint32 values.

    Returns the four output words as int64 tensors with values in [0, 2**32).
    """
    for _ in range(_ROUNDS):
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The uniform in (0, 1) for each (seed, step, token), broadcast together.

    Parameters
    ----------
    seed, step : int64 tensors
        Any int64 value; used as 64-bit two's-complement words.
    token : int64 tensor
        Token (column) indices in [0, 2**32).

    Returns
    -------
    fp32 tensor of the broadcast shape, values ``((r >> 9) + 0.5) * 2**-23`` with ``r`` the first Philox word.
    """
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2, c3 = step & _MASK32, (step >> 32) & _MASK32
    c0 = token & _MASK32
    r, _, _, _ = philox4x32_10(c0, torch.zeros_like(c0), c2, c3, k0, k1)
    return ((r >> 9).to(torch.float32) + 0.5) * 2.0**-23


def gumbel(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gumbel(0, 1) noise ``-log(-log(u))`` for :func:`uniform`'s ``u``, computed in ``dtype``."""
    u = uniform(seed, step, token).to(dtype)
    return -torch.log(-torch.log(u))


_STREAM_TAG = 0x53504543  # "SPEC": the second counter word of a derived seed (the op's counters use 0 there)


def stream_seed(seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The seed of noise stream ``stream`` (an integer >= 1) derived from ``seed`` (int64 tensor).

    ``(x0, x1, _, _) = Philox-4x32-10(counter=(stream, 0x53504543, 0, 0), key=(seed mod 2**32, seed >> 32))``
    and the result is the 64-bit two's-complement word ``x0 + 2**32 * x1`` as int64. Stream 0 is the op's
    own noise (the seed itself). A draw with a derived seed is ``uniform(stream_seed(seed, c), step, token)``:
    a pure function of (seed, stream, step, token), as independent of the op's noise as Philox's outputs for
    two keys are. Used by :mod:`proxytune.speculative` (streams 1, 2, 3).
    """
    if stream == 0:
        return seed
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = torch.full_like(seed, int(stream) & _MASK32)
    x0, x1, _, _ = philox4x32_10(c0, torch.full_like(seed, _STREAM_TAG), torch.zeros_like(seed), torch.zeros_like(seed), k0, k1)
    hi = x1 - (x1 >= 2**31).to(x1.dtype) * 2**32  # the high word as a signed 32-bit value: no int64 overflow
    return hi * 2**32 + x0

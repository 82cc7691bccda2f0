"""Launcher of the fused sampler kernel: checks, shapes, scratch buffers, grid.

:func:`proxy_sample` takes already-normalised arguments (``[B]`` parameter tensors, ``[P, B]`` weights; see
:class:`proxytune._args.SampleArgs`) and launches :func:`~proxytune.kernels.sample_kernel.proxy_sample_kernel`
once. Host syncs: none. The scratch buffers are cached per (device, B, S, CAP) and are zero between launches
(the kernel resets its own counters), so calls can be captured in a CUDA graph after one eager warm-up call
has created them. Two launches sharing a scratch must not run concurrently on different streams.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import triton

from .sample_kernel import proxy_sample_kernel

__all__ = ["proxy_sample", "MAX_PAIRS"]

MAX_PAIRS = 4  # pairs passed as separate pointers; more are folded into an fp32 base first (same order)
_LEVELS = 16  # top-k lower-bound levels counted per program (one nat apart)
_MAX_SPLIT = 256

_scratch: dict[tuple, tuple[torch.Tensor, ...]] = {}
_sm_count: dict[int, int] = {}


def _scratch_for(device: torch.device, batch: int, split: int, cap: int) -> tuple[torch.Tensor, ...]:
    key = (device, batch, split, cap)
    if key not in _scratch:
        _scratch[key] = (
            torch.empty(batch, split, 3, dtype=torch.float32, device=device),  # per-program max, sum, k-level
            torch.empty(batch, split, dtype=torch.int32, device=device),  # per-program first arg-max
            torch.empty(batch, cap, dtype=torch.float32, device=device),  # candidate logits s
            torch.empty(batch, cap, dtype=torch.int32, device=device),  # candidate token ids
            torch.zeros(batch, 2, dtype=torch.int32, device=device),  # candidate count, arrivals
        )
    return _scratch[key]


def _default_split(device: torch.device, batch: int, n_blocks: int) -> int:
    """Programs per row: about two waves of programs over the GPU (one on the interpreter)."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:  # read at call time, never at import
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    want = max(1, (2 * _sm_count[index]) // batch)
    return max(1, min(want, n_blocks // 2 or 1, _MAX_SPLIT))


def _row_major(name: str, x: torch.Tensor) -> torch.Tensor:
    if x.stride(1) != 1:  # the kernel reads contiguous rows; any row stride is fine
        x = x.contiguous()
    return x


def proxy_sample(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    anti_experts: Sequence[torch.Tensor],
    weights: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    vocab_size: int,
    *,
    block: Optional[int] = None,
    split: Optional[int] = None,
    cap: Optional[int] = None,
    has_top_k: bool = True,
    has_top_p: bool = True,
    has_min_p: bool = True,
    write_logprobs: bool = True,
    num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused sampler once. Semantics: ``docs/semantics.md`` (``validate=False`` behaviour).

    Parameters
    ----------
    base : [B, Vb]; experts, anti_experts : P x [B, Vx]; fp32/bf16/fp16, unit column stride preferred.
    weights : [P, B] fp32. temperature, top_p, min_p : [B] fp32. top_k, seed, step : [B] int64.
    vocab_size : V <= every width.
    block, split, cap : tile width, programs per row, candidate capacity (powers of two for block/cap);
        defaults suit a GPU. Small values let the interpreter exercise row splitting and the fallback.
    has_top_k, has_top_p, has_min_p : False compiles that filter out (the caller promises it is off in
        every row); True handles per-row on/off at run time.
    write_logprobs : False skips the log-probability store (the returned tensor is then uninitialised).

    Returns
    -------
    (token_ids int64 [B], logprobs fp32 [B]), new tensors on the logits' device.
    """
    device = base.device
    batch = base.shape[0]
    if device.type == "cpu" and not _interpreting():
        raise RuntimeError("the triton sampler runs CPU tensors only under TRITON_INTERPRET=1")
    if len(experts) != len(anti_experts):
        raise ValueError(f"got {len(experts)} experts but {len(anti_experts)} anti_experts")
    tensors = [base, *experts, *anti_experts, weights, temperature, top_k, top_p, min_p, seed, step]
    if any(t.device != device for t in tensors):
        raise ValueError("all tensors must be on the logits' device")
    if not 1 <= vocab_size <= min(x.shape[1] for x in (base, *experts, *anti_experts)):
        raise ValueError(f"vocab_size {vocab_size} is outside [1, narrowest width]")
    if vocab_size >= 2**31 - 2**20:
        raise ValueError("vocabularies of 2^31 tokens or more are not supported (int32 token ids inside)")
    for name, t in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if t.dtype != torch.float32 or t.shape != (batch,):
            raise ValueError(f"{name} must be fp32 [B], got {t.dtype} {tuple(t.shape)}")
    for name, t in (("top_k", top_k), ("seed", seed), ("step", step)):
        if t.dtype != torch.int64 or t.shape != (batch,):
            raise ValueError(f"{name} must be int64 [B], got {t.dtype} {tuple(t.shape)}")
    n_pairs = len(experts)
    if weights.shape != (n_pairs, batch) or weights.dtype != torch.float32:
        raise ValueError(f"weights must be fp32 [P, B] = [{n_pairs}, {batch}], got {weights.dtype} {tuple(weights.shape)}")

    experts = list(experts)
    anti_experts = list(anti_experts)
    if n_pairs > MAX_PAIRS:  # fold the leading pairs into an fp32 base, in the reference's order
        extra = n_pairs - MAX_PAIRS
        s = base[:, :vocab_size].float()
        for i in range(extra):
            s = s + weights[i][:, None] * (experts[i][:, :vocab_size].float() - anti_experts[i][:, :vocab_size].float())
        base, experts, anti_experts, weights = s, experts[extra:], anti_experts[extra:], weights[extra:]
        n_pairs = MAX_PAIRS
    base = _row_major("base", base)
    experts = [_row_major("expert", x) for x in experts]
    anti_experts = [_row_major("anti_expert", x) for x in anti_experts]

    block = block or (1024 if device.type == "cuda" else 256)
    cap = cap or (1024 if device.type == "cuda" else 512)
    if block & (block - 1) or cap & (cap - 1):
        raise ValueError("block and cap must be powers of two")
    n_blocks = triton.cdiv(vocab_size, block)
    split = split or _default_split(device, batch, n_blocks)
    split = max(1, min(split, n_blocks))
    slice_width = triton.cdiv(n_blocks, split) * block
    split = triton.cdiv(vocab_size, slice_width)  # no empty programs
    part_f, part_i, cand_s, cand_i, counters = _scratch_for(device, batch, split, cap)

    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    pairs = []
    for i in range(MAX_PAIRS):
        if i < n_pairs:
            pairs += [experts[i], experts[i].stride(0), anti_experts[i], anti_experts[i].stride(0)]
        else:
            pairs += [base, 0, base, 0]  # never read: N_PAIRS is a constexpr
    if n_pairs == 0:
        weights = torch.zeros(1, batch, dtype=torch.float32, device=device)
    params = []
    for t in (temperature, top_k, top_p, min_p, seed, step):
        params += [t, t.stride(0)]
    grid = (batch, split)
    extra = {} if num_warps is None else {"num_warps": num_warps}
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        proxy_sample_kernel[grid](
            base, base.stride(0), *pairs, weights, weights.stride(0), weights.stride(1), *params,
            tokens, logprobs, part_f, part_i, cand_s, cand_i, counters,
            vocab_size, slice_width, math.log(vocab_size),
            N_PAIRS=n_pairs, BLOCK=block, CAP=cap, S_POW2=triton.next_power_of_2(split), NB=_LEVELS,
            HAS_TOPK=has_top_k, HAS_TOPP=has_top_p, HAS_MINP=has_min_p, WRITE_LOGPROBS=write_logprobs,
            **extra,
        )  # fmt: skip
    return tokens, logprobs


def _interpreting() -> bool:
    """Triton's numpy interpreter is on (``TRITON_INTERPRET``, as triton itself reads it). Kept here, not
    imported from the backend glue above: the kernel layer imports nothing from proxytune."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False

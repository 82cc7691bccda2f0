"""Launcher of the fused sampler kernel: checks, launch settings, scratch buffers, grid.

:func:`proxy_sample` takes already-normalised arguments (``[B]`` parameter tensors, ``[P, B]`` weights; see
:class:`proxytune._args.SampleArgs`) and launches :func:`~proxytune.kernels.sample_kernel.proxy_sample_kernel`
once. Host syncs: none.

Launch settings (:func:`launch_settings`): on a GPU, tiles of ``BLOCK = CAP = 1024`` with :data:`NUM_WARPS`
warps and about two waves of programs over the SMs; :mod:`proxytune.kernels.aot` compiles exactly this
launch for a chosen target without a GPU and reports registers and spills.

Scratch (per-program partials, the candidate list, two counters) belongs to one stream: launches on one
stream run in order, so they can share it; another stream gets its own. Each stream keeps one pair of flat
buffers grown to the largest launch seen (not one per batch size). A launch captured into a CUDA graph
gets scratch of its own, kept alive by the graph's output tensors (keep those while the graph lives, as CUDA
graphs require). The counters are zeroed at every launch (a memset on the same stream, captured with the
kernel), so an interrupted launch cannot leave a later one a wrong count.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import triton

from .sample_kernel import proxy_sample_kernel

__all__ = ["proxy_sample", "launch_settings", "kernel_arguments", "LaunchSettings", "MAX_PAIRS", "NUM_WARPS"]

MAX_PAIRS = 4  # pairs passed as separate pointers; more are folded into an fp32 base first (same order)
# Warps per program on a GPU, chosen with kernels/aot.py (ptxas' report, sm_80 and sm_90, bf16 / fp16 / fp32,
# B in {1, 64, 256}, V in {32000, 50257, 128256, 151936, 262144}): at 4 warps every configuration runs out of
# registers and spills (255 registers, up to 600 bytes); at 8, rows whose width or stride is not a multiple of
# 16 (GPT-2's 50257) still spill on sm_90 (128 registers, 24 bytes); at 16 nothing spills anywhere (97-99
# registers), and each program has the most loads in flight, which matters at small B where the rows are
# split over fewer programs than SMs. tests/test_kernel_aot.py checks the table.
NUM_WARPS = 16
GPU_BLOCK = GPU_CAP = 1024  # tile width and candidate capacity on a GPU (powers of two)
INTERPRETER_BLOCK, INTERPRETER_CAP = 256, 512  # smaller tiles: the numpy interpreter's cost grows with them
_LEVELS = 16  # top-k lower-bound levels counted per program (one nat apart)
_MAX_SPLIT = 256

_sm_count: dict[int, int] = {}


class Scratch(NamedTuple):
    """Working memory of one launch: zero counters at the start, the rest is written before it is read."""

    part_f: torch.Tensor  # fp32 [B, S, 3]: per-program max, sum, top-k level
    part_i: torch.Tensor  # int32 [B, S]: per-program first arg-max
    cand_s: torch.Tensor  # fp32 [B, CAP]: candidate logits s
    cand_i: torch.Tensor  # int32 [B, CAP]: candidate token ids
    counters: torch.Tensor  # int32 [B, 2]: candidate count, arrivals

    @staticmethod
    def sizes(batch: int, split: int, cap: int) -> tuple[int, int]:
        """``(fp32 elements, int32 elements)`` one launch's scratch takes."""
        return batch * (split * 3 + cap), batch * (split + cap + 2)

    @classmethod
    def carve(cls, f32: torch.Tensor, i32: torch.Tensor, batch: int, split: int, cap: int) -> "Scratch":
        """Views into flat fp32 / int32 buffers of at least :meth:`sizes` elements (contiguous, as the kernel
        indexes them)."""
        n_part, n_cand = batch * split * 3, batch * cap
        part_f, cand_s = f32[:n_part].view(batch, split, 3), f32[n_part : n_part + n_cand].view(batch, cap)
        n_pi = batch * split
        part_i, cand_i = i32[:n_pi].view(batch, split), i32[n_pi : n_pi + n_cand].view(batch, cap)
        counters = i32[n_pi + n_cand : n_pi + n_cand + 2 * batch].view(batch, 2)
        return cls(part_f, part_i, cand_s, cand_i, counters)

    @classmethod
    def allocate(cls, device: torch.device, batch: int, split: int, cap: int) -> "Scratch":
        n_f, n_i = cls.sizes(batch, split, cap)
        f32 = torch.empty(n_f, dtype=torch.float32, device=device)
        scratch = cls.carve(f32, torch.empty(n_i, dtype=torch.int32, device=device), batch, split, cap)
        scratch.counters.zero_()
        return scratch


class _Arena(NamedTuple):
    """One stream's flat scratch buffers: they grow to the largest launch seen and are never duplicated
    per batch size (eager decoding shrinks the batch row by row)."""

    f32: torch.Tensor
    i32: torch.Tensor


_scratch: dict[tuple, _Arena] = {}  # (device, stream) -> its arena


def _scratch_for(device: torch.device, batch: int, split: int, cap: int) -> tuple[Scratch, bool]:
    """``(scratch, owned)``: views into the current stream's arena (grown when this launch needs more), or,
    inside a CUDA-graph capture, a new scratch that only this launch uses (``owned``: the caller ties its
    lifetime to the launch's outputs). Launches on one stream run in order, so they can share its arena;
    a replaced arena's memory returns to the caching allocator after the launches queued on it."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return Scratch.allocate(device, batch, split, cap), True
        stream = torch.cuda.current_stream(device).cuda_stream
    else:
        stream = 0  # the interpreter runs launches one after another
    n_f, n_i = Scratch.sizes(batch, split, cap)
    arena = _scratch.get((device, stream))
    if arena is None or arena.f32.numel() < n_f or arena.i32.numel() < n_i:
        old_f, old_i = (arena.f32.numel(), arena.i32.numel()) if arena is not None else (0, 0)
        arena = _Arena(
            torch.empty(max(n_f, old_f), dtype=torch.float32, device=device),
            torch.empty(max(n_i, old_i), dtype=torch.int32, device=device),
        )
        _scratch[device, stream] = arena
    return Scratch.carve(arena.f32, arena.i32, batch, split, cap), False


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read at call time, never at import; cached)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


@dataclass(frozen=True)
class LaunchSettings:
    """How one launch tiles the rows: ``split`` programs per row, each over ``slice_width`` columns."""

    block: int  # columns per tile (power of two)
    cap: int  # candidate capacity per row (power of two)
    split: int  # programs per row (no empty program)
    slice_width: int  # columns per program: a multiple of block
    num_warps: Optional[int]  # None: triton's default (the interpreter ignores it)


def launch_settings(
    batch: int, vocab_size: int, sms: Optional[int], *, block: Optional[int] = None, split: Optional[int] = None,
    cap: Optional[int] = None, num_warps: Optional[int] = None,
) -> LaunchSettings:  # fmt: skip
    """The settings :func:`proxy_sample` launches with. ``sms``: the GPU's SM count, or None for the
    interpreter. Explicit ``block`` / ``split`` / ``cap`` / ``num_warps`` override the defaults."""
    gpu = sms is not None
    block = block or (GPU_BLOCK if gpu else INTERPRETER_BLOCK)
    cap = cap or (GPU_CAP if gpu else INTERPRETER_CAP)
    if block & (block - 1) or cap & (cap - 1):
        raise ValueError("block and cap must be powers of two")
    n_blocks = triton.cdiv(vocab_size, block)
    if split is None:  # about two waves of programs over the GPU; one program per row on the interpreter
        split = max(1, min((2 * sms) // batch, n_blocks // 2 or 1, _MAX_SPLIT)) if gpu else 1
    split = max(1, min(split, n_blocks))
    slice_width = triton.cdiv(n_blocks, split) * block
    split = triton.cdiv(vocab_size, slice_width)  # no empty programs
    if num_warps is None and gpu:
        num_warps = NUM_WARPS
    return LaunchSettings(block, cap, split, slice_width, num_warps)


def _row_major(x: torch.Tensor) -> torch.Tensor:
    if x.stride(1) != 1:  # the kernel reads contiguous rows; any row stride is fine
        x = x.contiguous()
    return x


def proxy_sample(
    base: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor], weights: torch.Tensor,
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
    step: torch.Tensor, vocab_size: int, *, block: Optional[int] = None, split: Optional[int] = None,
    cap: Optional[int] = None, has_top_k: bool = True, has_top_p: bool = True, has_min_p: bool = True,
    write_logprobs: bool = True, num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the fused sampler once. Semantics: ``docs/semantics.md`` (``validate=False`` behaviour).

    Parameters
    ----------
    base : [B, Vb]; experts, anti_experts : P x [B, Vx]; fp32/bf16/fp16, unit column stride preferred.
    weights : [P, B] fp32. temperature, top_p, min_p : [B] fp32. top_k, seed, step : [B] int64.
    vocab_size : V <= every width.
    block, split, cap, num_warps : tile width, programs per row, candidate capacity (powers of two for
        block/cap), warps per program; default :func:`launch_settings`. Small values let the interpreter
        exercise row splitting and the fallback.
    has_top_k, has_top_p, has_min_p : False compiles that filter out (the caller promises it is off in
        every row); True handles per-row on/off at run time.
    write_logprobs : False computes no log-probability: the returned tensor is then only the fully-masked
        marker (NaN for a row with no finite logit, else 0).

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

    sms = sm_count(device) if device.type == "cuda" else None
    settings = launch_settings(batch, vocab_size, sms, block=block, split=split, cap=cap, num_warps=num_warps)
    scratch, owned = _scratch_for(device, batch, settings.split, settings.cap)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)
    grid, args, constants = kernel_arguments(
        base, experts, anti_experts, weights, temperature, top_k, top_p, min_p, seed, step, vocab_size,
        tokens, logprobs, scratch, settings, filters=(has_top_k, has_top_p, has_min_p), write_logprobs=write_logprobs,
    )  # fmt: skip
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        scratch.counters.zero_()
        proxy_sample_kernel[grid](*args, **constants)
    if owned:  # captured: the graph replays into this scratch for as long as its outputs live
        tokens._proxytune_scratch = logprobs._proxytune_scratch = scratch
    return tokens, logprobs


def kernel_arguments(
    base: torch.Tensor, experts: Sequence[torch.Tensor], anti_experts: Sequence[torch.Tensor], weights: torch.Tensor,
    temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
    step: torch.Tensor, vocab_size: int, tokens: torch.Tensor, logprobs: torch.Tensor, scratch: Scratch,
    settings: LaunchSettings, *, filters: tuple[bool, bool, bool] = (True, True, True), write_logprobs: bool = True,
) -> tuple[tuple[int, int], list, dict]:  # fmt: skip
    """``(grid, positional arguments, constexprs and launch options)`` of the kernel for checked arguments:
    what :func:`proxy_sample` launches and what :mod:`proxytune.kernels.aot` compiles (there with meta
    tensors). More than :data:`MAX_PAIRS` pairs are folded into an fp32 base here (a few elementwise ops,
    in the reference's order)."""
    experts, anti_experts = list(experts), list(anti_experts)
    n_pairs = len(experts)
    if n_pairs > MAX_PAIRS:
        extra = n_pairs - MAX_PAIRS
        s = base[:, :vocab_size].float()
        for i in range(extra):
            s = s + weights[i][:, None] * (experts[i][:, :vocab_size].float() - anti_experts[i][:, :vocab_size].float())
        base, experts, anti_experts, weights = s, experts[extra:], anti_experts[extra:], weights[extra:]
        n_pairs = MAX_PAIRS
    base = _row_major(base)
    experts = [_row_major(x) for x in experts]
    anti_experts = [_row_major(x) for x in anti_experts]
    pairs = []
    for i in range(MAX_PAIRS):
        if i < n_pairs:
            pairs += [experts[i], experts[i].stride(0), anti_experts[i], anti_experts[i].stride(0)]
        else:
            pairs += [base, 0, base, 0]  # never read: N_PAIRS is a constexpr
    if n_pairs == 0:
        weights = torch.zeros(1, base.shape[0], dtype=torch.float32, device=base.device)
    params = []
    for t in (temperature, top_k, top_p, min_p, seed, step):
        params += [t, t.stride(0)]
    args = [
        base, base.stride(0), *pairs, weights, weights.stride(0), weights.stride(1), *params, tokens, logprobs,
        *scratch, vocab_size, settings.slice_width, math.log(vocab_size),
    ]  # fmt: skip
    has_top_k, has_top_p, has_min_p = filters
    constants = dict(
        N_PAIRS=n_pairs, BLOCK=settings.block, CAP=settings.cap, S_POW2=triton.next_power_of_2(settings.split),
        NB=_LEVELS, HAS_TOPK=has_top_k, HAS_TOPP=has_top_p, HAS_MINP=has_min_p, WRITE_LOGPROBS=write_logprobs,
    )  # fmt: skip
    # No fused multiply-adds: s = base + w * (e - a) rounds as the reference's separate multiply and add.
    # (The interpreter drops compiler options.)
    constants["enable_fp_fusion"] = False
    if settings.num_warps is not None:
        constants["num_warps"] = settings.num_warps
    return (base.shape[0], settings.split), args, constants


def _interpreting() -> bool:
    """Triton's numpy interpreter is on (``TRITON_INTERPRET``, as triton itself reads it). Kept here, not
    imported from the backend glue above: the kernel layer imports nothing from proxytune."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


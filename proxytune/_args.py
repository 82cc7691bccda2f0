"""Checking and normalising the arguments of the public ops.

Every public op turns its loose arguments (scalars or per-row tensors, sequences of experts) into one
:class:`SampleArgs` of ``[B]`` tensors on the logits' device, so backends only compute. Shape, dtype and
device checks never sync. Value checks on tensors (NaN logits, out-of-range per-row parameters) read the
tensors on the host and run only when ``validate=True``.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
from typing import NamedTuple, Union

import torch

from proxytune._rules import MAX_WEIGHT, check_weight

__all__ = ["SampleArgs", "Scalar", "PerRow", "normalize", "check_filter_scalars", "check_filters_used", "fresh_seed",
           "FILTER_NAMES"]

Scalar = Union[int, float]
PerRow = Union[int, float, torch.Tensor]

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT64_MIN, _UINT64_END = -(2**63), 2**64
FP32_MAX = float(torch.finfo(torch.float32).max)  # 3.4e38: larger Python floats do not fit the fp32 parameters
FP32_SMALLEST = 2.0**-149  # the smallest positive fp32 (subnormal): smaller positive values would become 0
TOP_K_MAX = 2**62  # top_k past any vocabulary: larger values mean the same (keep every token)
_CPU = torch.device("cpu")
_PLAIN = (float, int)  # Python numbers that need no conversion (bool is a subclass, not one of these)


class SampleArgs(NamedTuple):
    """Normalised op arguments. Logits keep their dtype; every parameter is ``[B]`` (weights ``[P, B]``).

    CPU parameter tensors made from Python scalars are shared between calls (see :func:`_filled`): backends
    read them and never write them. (A named tuple: built on every call, and cheaper to build than a frozen
    dataclass.)
    """

    base: torch.Tensor  # [B, Vb]
    experts: tuple[torch.Tensor, ...]  # P x [B, Vx]
    anti_experts: tuple[torch.Tensor, ...]  # P x [B, Vx]
    weights: torch.Tensor  # [P, B] fp32
    temperature: torch.Tensor  # [B] fp32, 0 = greedy
    top_k: torch.Tensor  # [B] int64, 0 = off
    top_p: torch.Tensor  # [B] fp32, 1 = off
    min_p: torch.Tensor  # [B] fp32, 0 = off
    seed: torch.Tensor  # [B] int64
    step: torch.Tensor  # [B] int64
    vocab_size: int
    # (top-k, top-p, min-p): whether the filter may be on in some row, known on the host without a sync. False
    # where a Python scalar turns it off for every row (or a scalar temperature makes every row greedy), or
    # where the caller's ``filters_used`` leaves it out; a filter that is False here is off in every row, in
    # every backend (the Triton kernel compiles it out, the C++ op and the reference ignore its parameter).
    filters_on: tuple[bool, bool, bool] = (True, True, True)
    # Whether the caller reads the log-probabilities. False: no backend computes them; the second output of
    # a backend's sample is then only the fully-masked marker (NaN for such a row, else 0).
    logprobs: bool = True

    def filter_bits(self) -> int:
        """:attr:`filters_on` as the C++ op's ``filters`` bits (1 top-k, 2 top-p, 4 min-p)."""
        k_on, p_on, m_on = self.filters_on
        return k_on | p_on << 1 | m_on << 2

    def without_unused_filters(self) -> "SampleArgs":
        """These arguments with each filter that :attr:`filters_on` rules out set to its off value in every row
        (what a backend that cannot compile a filter out computes with)."""
        if all(self.filters_on):
            return self
        k_on, p_on, m_on = self.filters_on
        return self._replace(
            top_k=self.top_k if k_on else torch.zeros_like(self.top_k),
            top_p=self.top_p if p_on else torch.ones_like(self.top_p),
            min_p=self.min_p if m_on else torch.zeros_like(self.min_p),
        )

    def op_arguments(self) -> tuple:
        """``(base, experts, anti_experts, weights, temperature, top_k, top_p, min_p, seed, step, vocab_size)``:
        the positional arguments of every backend's sample function (and of ``torch.ops.proxytune.sample``)."""
        return tuple(self[:11])

    def combine_arguments(self) -> tuple:
        """``(base, experts, anti_experts, weights, vocab_size)``: the arguments of the combine functions."""
        return (self.base, self.experts, self.anti_experts, self.weights, self.vocab_size)


def _check_logits(name: str, x: object, device: torch.device | None) -> torch.Tensor:
    """``x`` itself when it is a usable ``[B, V]`` logits tensor (on ``device`` when given); else raises.
    ``name`` may be a ``(sequence name, index)`` pair, formatted only for an error (the call is per op)."""
    if type(name) is tuple:
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.dtype in LOGIT_DTYPES and x.device == device and x.shape[1]:
            return x
        name = f"{name[0]}[{name[1]}]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of logits [B, V], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, V], got shape {tuple(x.shape)}")
    if x.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but base is on {device}; put all logits on one device")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (a shape without values); pass real logits")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has an empty vocabulary (shape {tuple(x.shape)})")
    return x


def _as_tensor_sequence(name: str, xs: object) -> tuple[object, ...]:
    if isinstance(xs, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of [B, V] tensors, not a single tensor; wrap it: [{name[:-1]}]")
    try:
        return tuple(xs)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be a sequence of [B, V] tensors, got {type(xs).__name__}") from None


def _per_row(
    name: str, value: object, batch: int, device: torch.device, dtype: torch.dtype, integer: bool
) -> torch.Tensor:
    """A scalar or ``[B]`` tensor as a ``[B]`` tensor of ``dtype`` on ``device`` (no host sync)."""
    kind = type(value)
    if kind is float and not integer or kind is int and -(2**62) <= value < 2**62:  # the common case, fast
        return _filled(value, batch, dtype, device)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a number or a [B] tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if not integer and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.dim() == 0:
            return value.to(device=device, dtype=dtype).expand(batch)
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"{name} must be a scalar or a [B] = [{batch}] tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}")
        return value.to(dtype)
    if integer:
        if not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        value = int(value)
        if not _INT64_MIN <= value < _UINT64_END:
            raise ValueError(f"{name}={value} does not fit in 64 bits")
        if value >= 2**63:  # a uint64 word: keep its bits
            value -= 2**64
    return _filled(value, batch, dtype, device)


@functools.lru_cache(maxsize=1024)
def _cached_full(value: Scalar, shape: Union[int, tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    return torch.full((shape,) if type(shape) is int else shape, value, dtype=dtype)


def _filled(value: Scalar, shape: Union[int, tuple[int, int]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.full(shape, value)`` (``shape`` an int: ``[shape]``), cached for CPU tensors: a decode loop
    passes the same scalars at every step, and building them anew costs more than the CPU op on a small
    batch. Device tensors are built afresh (a cached one could be read on another stream before its fill
    ran, or be recorded, not filled, inside a CUDA graph capture)."""
    if device == _CPU:
        return _cached_full(value, shape, dtype)
    return torch.full((shape,) if type(shape) is int else shape, value, dtype=dtype, device=device)


def _weights(weights: object, n_pairs: int, batch: int, device: torch.device) -> torch.Tensor:
    """Weights as ``[P, B]`` fp32: one scalar/[B] for all pairs, a sequence with one per pair, or [P, B]."""
    if isinstance(weights, torch.Tensor) and weights.dim() == 2:
        if tuple(weights.shape) != (n_pairs, batch):
            raise ValueError(f"weights as a 2-D tensor must be [P, B] = [{n_pairs}, {batch}], got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got {weights.dtype}")
        if weights.device != device:
            raise ValueError(f"weights is on {weights.device} but the logits are on {device}")
        return weights.to(torch.float32)
    if isinstance(weights, (list, tuple)):
        if len(weights) != n_pairs:
            raise ValueError(f"weights has {len(weights)} entries but there are {n_pairs} expert pairs")
        rows = [_per_row(f"weights[{i}]", w, batch, device, torch.float32, False) for i, w in enumerate(weights)]
        return torch.stack(rows) if rows else torch.empty(0, batch, device=device)
    if type(weights) in _PLAIN:  # the common case, fast
        return _filled(weights, (n_pairs, batch), torch.float32, device)
    return _per_row("weights", weights, batch, device, torch.float32, False).expand(n_pairs, batch)


def _filters_on(temperature: object, top_k: object, top_p: object, min_p: object, vocab_size: int) -> tuple[bool, bool, bool]:
    """:attr:`SampleArgs.filters_on` from the parameters as given: a tensor may turn a filter on in any row;
    a Python number decides for every row (the rules of ``docs/semantics.md``: top-k is on for 0 < k < V,
    top-p for p < 1 or NaN, min-p for p > 0 or NaN; a temperature that is not > 0 is greedy: no filter)."""
    if _real(temperature) and not temperature > 0:
        return (False, False, False)
    k_on = not (_real(top_k) and not 0 < top_k < vocab_size)
    p_on = not (_real(top_p) and top_p >= 1)
    m_on = not (_real(min_p) and min_p <= 0)
    return (k_on, p_on, m_on)


FILTER_NAMES = ("top_k", "top_p", "min_p")  # the order of SampleArgs.filters_on


def check_filters_used(filters_used: object) -> frozenset | None:
    """``filters_used`` as a frozenset of :data:`FILTER_NAMES` (None stays None: infer from the scalars)."""
    if filters_used is None:
        return None
    if isinstance(filters_used, str) or not isinstance(filters_used, (set, frozenset, list, tuple)):
        raise TypeError(f"filters_used must be None or a set of {FILTER_NAMES}, got {type(filters_used).__name__}")
    unknown = sorted(set(filters_used) - set(FILTER_NAMES), key=str)
    if unknown:
        raise ValueError(f"filters_used may hold only {FILTER_NAMES}; got {unknown}")
    return frozenset(filters_used)


def _check_filters_used(args: SampleArgs, inferred: tuple[bool, bool, bool], used: frozenset) -> None:
    """Under ``validate=True``: no sampled row (temperature > 0) uses a filter outside ``used`` (host sync)."""
    sampled = args.temperature > 0
    rules = {
        "top_k": (args.top_k > 0) & (args.top_k < args.vocab_size),
        "top_p": ~(args.top_p >= 1),
        "min_p": ~(args.min_p <= 0),
    }
    for name, could in zip(FILTER_NAMES, inferred):
        if not could or name in used:
            continue
        bad = rules[name] & sampled
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"row {row} uses {name}={getattr(args, name)[row].item():.6g} but filters_used={sorted(used)} leaves "
                f"{name} out; add it to filters_used (or pass filters_used=None)"
            )


def fresh_seed() -> int:
    """A new 64-bit seed from torch's default CPU generator (``torch.manual_seed`` makes it repeatable; no
    device sync): what ``seed=None`` means for the op and for an engine request."""
    return int(torch.randint(_INT64_MIN, 2**63 - 1, ()))


def _to_fp32(x: float) -> float:
    """``x`` rounded to float32 (the op's parameter type); inf past its range."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _real(x: object) -> bool:
    """A Python/numpy real number (bool included, as ``numbers.Real`` has it); plain floats and ints first."""
    return type(x) is float or type(x) is int or isinstance(x, numbers.Real)


def check_filter_scalars(temperature, top_k, top_p, min_p, weights):
    """Range checks for the Python-number parameters (tensors pass through): free, so always done.

    Returns ``(temperature, top_k, top_p, min_p, weights)`` ready for fp32 / int64 tensors: a positive
    temperature or top_p below the smallest fp32 becomes that smallest fp32 (top_p: every p <= 1/V keeps the
    same set; temperature: still a draw, not greedy), a top_k past :data:`TOP_K_MAX` becomes it (the same
    keep-everything filter). Numbers that cannot be fp32 parameters (above 3.4e38) raise ``ValueError``, as do
    out-of-range values; weights follow :func:`proxytune._rules.check_weight` (``|w| <= 1e6``).
    """

    def bad(name, rule, value):
        return ValueError(f"{name} must be {rule}, got {value!r}")

    if _real(temperature):
        if not 0 <= temperature <= FP32_MAX:
            raise bad("temperature", "finite and >= 0 (0 = greedy), at most 3.4e38 (float32)", temperature)
        if 0 < temperature < FP32_SMALLEST:
            temperature = FP32_SMALLEST
    if type(top_k) is int or isinstance(top_k, numbers.Integral) and not isinstance(top_k, bool):
        if top_k < 0:
            raise bad("top_k", ">= 0 (0 = off)", top_k)
        top_k = min(int(top_k), TOP_K_MAX)
    if _real(top_p):
        if not 0 < top_p <= 1:
            raise bad("top_p", "in (0, 1]", top_p)
        top_p = max(top_p, FP32_SMALLEST)
    if _real(min_p) and not (0 <= min_p < 1 and _to_fp32(min_p) < 1):  # 0.99999999999 is 1 in fp32: all off
        raise bad("min_p", "in [0, 1), also when rounded to float32", min_p)
    for w in weights if isinstance(weights, (list, tuple)) else (weights,):
        if not isinstance(w, torch.Tensor):  # the one weight rule (proxytune._rules), as every entry point has it
            check_weight(w)
    return temperature, top_k, top_p, min_p, weights


def _check_tensor_values(args: SampleArgs, params: bool = True) -> None:
    """Finite-or--inf checks for the logits and (``params``) range checks for the per-row parameter tensors
    (host syncs). Parameters built from Python numbers were checked already: pass ``params=False``."""
    checks = [] if not params else [
        ("temperature", ~((args.temperature >= 0) & (args.temperature < float("inf"))), "finite and >= 0"),
        ("top_k", args.top_k < 0, ">= 0"),
        ("top_p", ~((args.top_p > 0) & (args.top_p <= 1)), "in (0, 1]"),
        ("min_p", ~((args.min_p >= 0) & (args.min_p < 1)), "in [0, 1)"),
        ("weights", ~(args.weights.abs() <= MAX_WEIGHT).all(dim=0), "finite and |w| <= 1e6"),
    ]
    for name, bad, rule in checks:
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            values = args.weights[:, row].tolist() if name == "weights" else getattr(args, name)[row].item()
            raise ValueError(f"{name} must be {rule}; row {row} has {values}")
    named = [("base", args.base)]
    named += [(f"experts[{i}]", x) for i, x in enumerate(args.experts)]
    named += [(f"anti_experts[{i}]", x) for i, x in enumerate(args.anti_experts)]
    for name, x in named:
        x = x[:, : args.vocab_size]  # columns past the common vocabulary are ignored
        if not x.numel() or x.max().item() < float("inf"):  # one reduction: max is NaN if any entry is NaN
            continue
        bad = torch.isnan(x) | torch.isposinf(x)
        if bool(bad.any()):
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(
                f"{name} has {x[row, col].item()} at row {row}, token {col}; logits must be finite or -inf "
                "(pass validate=False to treat such entries as masked)"
            )


def _filter_tensors(weights, temperature, top_k, top_p, min_p, n_pairs: int, batch: int, device: torch.device):
    """Checked ``(weights [P, B], temperature, top_k, top_p, min_p [B])`` tensors on ``device``."""
    temperature, top_k, top_p, min_p, weights = check_filter_scalars(temperature, top_k, top_p, min_p, weights)
    return (
        _weights(weights, n_pairs, batch, device),
        _per_row("temperature", temperature, batch, device, torch.float32, False),
        _per_row("top_k", top_k, batch, device, torch.int64, True),
        _per_row("top_p", top_p, batch, device, torch.float32, False),
        _per_row("min_p", min_p, batch, device, torch.float32, False),
    )


@functools.lru_cache(maxsize=256)
def _cached_filters(weights, temperature, top_k, top_p, min_p, n_pairs: int, batch: int):
    """:func:`_filter_tensors` of plain Python numbers on the CPU, checked and built once per distinct call
    (a failed check raises and caches nothing)."""
    return _filter_tensors(weights, temperature, top_k, top_p, min_p, n_pairs, batch, _CPU)


def normalize(
    base: object,
    experts: object,
    anti_experts: object,
    *,
    weights: object,
    temperature: object,
    top_k: object,
    top_p: object,
    min_p: object,
    seed: object,
    step: object,
    vocab_size: object,
    validate: bool,
    filters_used: object = None,
    logprobs: bool = True,
) -> SampleArgs:
    """Check the public ops' arguments and normalise them into :class:`SampleArgs`.

    ``seed=None`` draws a fresh seed from torch's default CPU generator (no device sync). With
    ``validate=True`` value checks on tensors sync with the device; with ``validate=False`` only the free
    checks (types, shapes, devices, Python scalar ranges) run. ``filters_used`` (None or a set of
    :data:`FILTER_NAMES`) narrows :attr:`SampleArgs.filters_on`; with ``validate=True`` a row that uses a
    filter outside it raises ``ValueError``, without it the promise is trusted (that filter is off).
    """
    used = check_filters_used(filters_used)
    base = _check_logits("base", base, None)
    device = base.device
    batch, min_width = base.shape
    experts = _as_tensor_sequence("experts", experts)
    antis = _as_tensor_sequence("anti_experts", anti_experts)
    if len(experts) != len(antis):
        raise ValueError(f"got {len(experts)} experts but {len(antis)} anti_experts; they come in pairs")
    for group, xs in (("experts", experts), ("anti_experts", antis)):
        for i, x in enumerate(xs):
            rows, width = _check_logits((group, i), x, device).shape
            if rows != batch:
                raise ValueError(f"{group}[{i}] has batch size {rows} but base has {batch}")
            min_width = min(min_width, width)
    if vocab_size is None:
        vocab_size = min_width
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    elif not 1 <= vocab_size <= min_width:
        raise ValueError(f"vocab_size must be in [1, {min_width}] (the narrowest logits' width), got {vocab_size}")

    if seed is None:
        seed = fresh_seed()
    if (
        type(top_k) is int and type(weights) in _PLAIN and type(temperature) in _PLAIN and type(top_p) in _PLAIN
        and type(min_p) in _PLAIN and device == _CPU
    ):  # fmt: skip
        filters = _cached_filters(weights, temperature, top_k, top_p, min_p, len(experts), batch)  # one lookup
        plain = True
    else:
        filters = _filter_tensors(weights, temperature, top_k, top_p, min_p, len(experts), batch, device)
        plain = False
    inferred = _filters_on(temperature, top_k, top_p, min_p, int(vocab_size))
    args = SampleArgs(
        base, experts, antis, *filters,
        seed=_per_row("seed", seed, batch, device, torch.int64, True),
        step=_per_row("step", step, batch, device, torch.int64, True),
        vocab_size=int(vocab_size),
        filters_on=inferred,
        logprobs=bool(logprobs),
    )
    if validate:
        _check_tensor_values(args, params=not plain)
    if used is not None:
        if validate:
            _check_filters_used(args, inferred, used)
        args = args._replace(filters_on=tuple(on and name in used for name, on in zip(FILTER_NAMES, inferred)))
    return args

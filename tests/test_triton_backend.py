"""The fused Triton sampler against the reference implementation.

Without a CUDA GPU the kernels run in triton's numpy interpreter (``TRITON_INTERPRET=1``, set below before
the kernels are imported) at small sizes, with small tiles so that rows split over several programs, and
with candidate capacities that force either the candidate path (capacity >= V) or the exact multi-pass
fallback (capacity 16). The variable only changes how triton decorates kernels imported after it is set;
no other module of this package uses triton, and ``auto`` never picks the triton backend on CPU tensors.
On a GPU machine the same tests run the compiled kernel; the ``cuda``-marked tests add real sizes and
CUDA-graph capture.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from conformance import FILTERS as ALL_FILTERS, as_tuple  # noqa: E402

from proxytune import _args, backends, sample  # noqa: E402
from proxytune._triton_backend import make_backend  # noqa: E402
from proxytune.reference import sample_reference  # noqa: E402
from proxytune.testing import proxy_inputs  # noqa: E402

from proxytune.kernels.launch import proxy_sample  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# numpy evaluates both sides of tl.where in the interpreter: inf - inf in a discarded branch warns
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
FORCE_FALLBACK = 16  # candidate capacity that overflows on all but the most peaked rows


def _normalized(base, experts, antis, validate=True, **params):
    params.setdefault("seed", 1234)
    params.setdefault("step", 7)
    defaults = dict(weights=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, vocab_size=None)
    defaults.update(params)
    return _args.normalize(base, experts, antis, validate=validate, **defaults)


def _check(args, block=64, split=3, cap=256, exact_logprob=True):
    """Run the kernel and the reference on the same arguments; tokens equal, logprobs within fp32 error."""
    tokens, logprobs = proxy_sample(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size, block=block, split=split, cap=cap,
    )  # fmt: skip
    ref_tokens, ref_logprobs = sample_reference(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size,
    )  # fmt: skip
    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert ((tokens >= 0) & (tokens < args.vocab_size)).all()
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-5, rtol=2e-5, equal_nan=True)
    return tokens, logprobs


def _inputs(batch, width, n_pairs=1, dtype=torch.float32, seed=0, expert_width=None, scale=1.0):
    base, experts, antis = proxy_inputs(batch, width, n_pairs, dtype, "cpu", seed, expert_width)
    move = lambda x: (x.float() * scale).to(dtype).to(DEVICE)  # noqa: E731
    return move(base), [move(x) for x in experts], [move(x) for x in antis]


# (temperature, top_k, top_p, min_p): every filter alone, in pairs, all together, and none; the tile and
# fallback cases take these entries of the one filter table (tests/conformance.py).
FILTERS = [as_tuple(ALL_FILTERS[i]) for i in (1, 20, 8, 12, 10, 17, 16, 19)]


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", FILTERS)
@pytest.mark.parametrize("cap", [256, FORCE_FALLBACK], ids=["candidates", "fallback"])
def test_matches_reference(temperature, top_k, top_p, min_p, cap):
    # V = 200 <= cap: every candidate fits, so cap=256 always takes the candidate path.
    base, experts, antis = _inputs(3, 200, n_pairs=1, seed=len(FILTERS) * top_k + int(10 * temperature))
    args = _normalized(base, experts, antis, weights=0.8, temperature=temperature, top_k=top_k, top_p=top_p,
                       min_p=min_p, seed=torch.tensor([3, -5, 2**40 + 1], device=DEVICE))  # fmt: skip
    _check(args, block=32, split=3, cap=cap)


def test_peaked_rows_long_vocabulary_candidate_path():
    # Sharper logits: the candidate bounds hold a few tokens out of 3000, split over 4 programs.
    base, experts, antis = _inputs(2, 3000, n_pairs=1, seed=3, scale=3.0)
    for params in (dict(top_p=0.9), dict(top_k=50, top_p=0.9, temperature=0.8), dict(min_p=0.05), dict(top_k=50)):
        args = _normalized(base, experts, antis, **params)
        _check(args, block=256, split=4, cap=64)


def test_dtype_mix_widths_and_pairs():
    base, _, _ = _inputs(3, 300, dtype=torch.bfloat16, seed=4)
    _, experts, antis = _inputs(3, 310, n_pairs=2, dtype=torch.float16, seed=5)
    antis[1] = antis[1].float()
    args = _normalized(base, experts, antis, weights=torch.tensor([[0.5, 1.0, 2.0], [1.5, -0.5, 0.0]], device=DEVICE),
                       top_p=0.9)  # fmt: skip
    assert args.vocab_size == 300
    _check(args, block=64, split=2, cap=512)
    _check(_normalized(base, experts, antis, vocab_size=257, top_k=7), block=64, split=3, cap=FORCE_FALLBACK)


@pytest.mark.parametrize("n_pairs", [0, 5])
def test_no_experts_and_more_pairs_than_pointers(n_pairs):
    base, experts, antis = _inputs(2, 150, n_pairs=n_pairs, seed=6)
    weights = [0.1 * (i + 1) for i in range(n_pairs)] if n_pairs else 1.0
    _check(_normalized(base, experts, antis, weights=weights, top_p=0.9), block=32, split=2)


def test_per_row_parameters_and_seeds():
    base, experts, antis = _inputs(1, 180, seed=7)
    rows = 6
    base, experts, antis = base.expand(rows, -1), [experts[0].expand(rows, -1)], [antis[0].expand(rows, -1)]
    dev = dict(device=DEVICE)
    args = _normalized(
        base, experts, antis,
        temperature=torch.tensor([0.0, 0.7, 1.3, 1.0, 1.0, 2.0], **dev),
        top_k=torch.tensor([0, 5, 0, 50, 0, 3], **dev),
        top_p=torch.tensor([1.0, 0.9, 0.5, 0.95, 1.0, 1.0], **dev),
        min_p=torch.tensor([0.0, 0.0, 0.1, 0.02, 0.0, 0.0], **dev),
        seed=torch.tensor([1, 2, 3, 4, 5, -(2**63)], **dev),
        step=torch.tensor([0, 1, 2**32 + 5, 3, -1, 9], **dev),
    )  # fmt: skip
    tokens, _ = _check(args, block=32, split=2, cap=128)
    # the same row draws the same token whatever batch it sits in
    one = _normalized(base[3:4], [experts[0][3:4]], [antis[0][3:4]], temperature=1.0, top_k=50, top_p=0.95,
                      min_p=0.02, seed=4, step=3)  # fmt: skip
    assert _check(one, block=32, split=2, cap=128)[0].tolist() == tokens[3:4].tolist()


def test_many_seeds_same_tokens():
    base, experts, antis = _inputs(1, 120, seed=8)
    rows = 16
    base, experts, antis = base.expand(rows, -1), [experts[0].expand(rows, -1)], [antis[0].expand(rows, -1)]
    args = _normalized(base, experts, antis, top_p=0.95, seed=torch.arange(rows, device=DEVICE) * 7919)
    tokens, _ = _check(args, block=32, split=2, cap=128)
    assert len(set(tokens.tolist())) > 1  # the draw is random, not an argmax


def test_ties_and_flat_rows():
    g = torch.Generator().manual_seed(9)
    ties = torch.randint(-3, 3, (3, 160), generator=g).float()  # many exact ties at every boundary
    flat = torch.zeros(2, 160)  # every token tied: the whole row is the nucleus
    base = torch.cat([ties, flat]).to(DEVICE)
    for params in (dict(), dict(top_k=7), dict(top_p=0.5), dict(top_k=20, top_p=0.3), dict(min_p=0.3)):
        for cap in (256, FORCE_FALLBACK):
            _check(_normalized(base, [], [], **params), block=32, split=3, cap=cap)


def test_masked_entries_and_top_k_beyond_vocabulary():
    base, experts, antis = _inputs(4, 200, seed=10)
    g = torch.Generator().manual_seed(11)
    base = base.masked_fill((torch.rand(4, 200, generator=g) < 0.5).to(DEVICE), float("-inf"))
    experts[0] = experts[0].masked_fill((torch.rand(4, 200, generator=g) < 0.2).to(DEVICE), float("-inf"))
    base[3, :197] = float("-inf")  # three finite tokens: fewer than top_k
    for params in (dict(top_k=1000), dict(top_k=10, top_p=0.9), dict(top_p=0.99), dict(min_p=0.01)):
        for cap in (256, FORCE_FALLBACK):
            _check(_normalized(base, experts, antis, **params), block=32, split=3, cap=cap)


def test_validate_false_edge_values():
    base, experts, antis = _inputs(6, 100, seed=12)
    base[5] = float("-inf")  # fully masked: token 0, NaN logprob
    base[4, 10] = float("nan")  # NaN counts as masked
    base[4, 11] = float("inf")  # so does +inf
    dev = dict(device=DEVICE)
    args = _normalized(
        base, experts, antis, validate=False,
        temperature=torch.tensor([float("nan"), -1.0, 1.0, 1.0, 1.0, 1.0], **dev),
        top_p=torch.tensor([0.9, 0.9, float("nan"), 0.0, 0.7, 0.9], **dev),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, float("nan"), 0.0], **dev),
        top_k=torch.tensor([0, 0, 0, -3, 0, 4], **dev),
    )  # fmt: skip
    for cap in (256, FORCE_FALLBACK):
        tokens, logprobs = _check(args, block=32, split=2, cap=cap)
        assert tokens[5] == 0 and math.isnan(logprobs[5])
        assert logprobs[0] == 0 and logprobs[1] == 0  # greedy rows


def test_scratch_is_reset_between_launches_and_split_does_not_matter():
    base, experts, antis = _inputs(3, 400, seed=13)
    args = _normalized(base, experts, antis, top_k=25, top_p=0.9)
    first = _check(args, block=32, split=5, cap=128)
    for split in (1, 5, 13):  # 13 programs per row, the same scratch reused by the split-5 launches
        again = _check(args, block=32, split=split, cap=128)
        assert again[0].tolist() == first[0].tolist()


def test_an_interrupted_launch_does_not_poison_the_next():
    # Counters left non-zero (as a launch stopped half-way would leave them) are zeroed by the next launch.
    from proxytune.kernels import launch

    base, experts, antis = _inputs(3, 400, seed=13)
    args = _normalized(base, experts, antis, top_k=25, top_p=0.9)
    first = _check(args, block=32, split=5, cap=128)
    for arena in launch._scratch.values():
        arena.i32.fill_(7)  # the counters live in the int32 buffer
    assert _check(args, block=32, split=5, cap=128)[0].tolist() == first[0].tolist()


def test_scratch_is_one_arena_per_stream_whatever_the_batch_size():
    # Eager decoding shrinks the batch row by row: the scratch cache must not keep one buffer pair per size.
    from proxytune.kernels import launch

    base, experts, antis = _inputs(5, 300, seed=17)
    launch._scratch.clear()
    for b in (5, 4, 3, 2, 1, 5):
        args = _normalized(base[:b], [x[:b] for x in experts], [x[:b] for x in antis], top_k=25, top_p=0.9)
        _check(args, block=64, split=3, cap=128)
    assert len(launch._scratch) == 1
    (arena,) = launch._scratch.values()
    assert (arena.f32.numel(), arena.i32.numel()) == launch.Scratch.sizes(5, 3, 128)


# (top_k, top_p, min_p, temperature) as Python scalars -> the filters the backend leaves compiled in
SCALAR_FILTERS = [
    ((0, 1.0, 0.0, 1.0), (False, False, False)),
    ((20, 1.0, 0.0, 0.8), (True, False, False)),
    ((0, 0.9, 0.0, 0.8), (False, True, False)),
    ((0, 1.0, 0.05, 1.2), (False, False, True)),
    ((30, 0.8, 0.02, 1.0), (True, True, True)),
    ((5, 0.5, 0.1, 0.0), (False, False, False)),  # greedy: no filter matters
    ((10**9, 1.0, 0.0, 1.0), (False, False, False)),  # top_k >= V keeps everything: off
]


@pytest.mark.parametrize("params, flags", SCALAR_FILTERS)
def test_filters_off_in_every_row_are_compiled_out(monkeypatch, params, flags):
    # Filters that Python scalars turn off reach the kernel as HAS_*=False (compiled out, as vLLM's sampler
    # skips top-k / top-p work for batches without them), and the tokens are still the reference's.
    from proxytune.kernels import launch

    seen = []
    real = launch.proxy_sample
    monkeypatch.setattr(launch, "proxy_sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    top_k, top_p, min_p, temperature = params
    base, experts, antis = _inputs(3, 200, seed=top_k % 97 + 1)
    kwargs = dict(top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature, seed=11, step=3)
    tokens, logprobs = sample(base, experts, antis, backend="triton", return_logprobs=True, **kwargs)
    ref_tokens, ref_logprobs = sample(base, experts, antis, backend="reference", return_logprobs=True, **kwargs)
    assert (seen[0]["has_top_k"], seen[0]["has_top_p"], seen[0]["has_min_p"]) == flags
    assert tokens.tolist() == ref_tokens.tolist()
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-5, rtol=2e-5)


def test_filter_tensors_stay_compiled_in():
    base, experts, antis = _inputs(2, 90, seed=3)
    off = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    args = _normalized(base, experts, antis, top_k=off, top_p=torch.ones(2, device=DEVICE))
    assert args.filters_on == (True, True, False)  # a tensor may turn a filter on in any row; min_p=0.0 is off


def test_host_flags_compile_filters_out_of_tensor_parameters(monkeypatch):
    # filters_used (the engine's word, from its requests) compiles unused filters out even when every
    # parameter is a [B] tensor, and return_logprobs=False reaches the kernel as WRITE_LOGPROBS=False.
    from proxytune.kernels import launch

    seen = []
    real = launch.proxy_sample
    monkeypatch.setattr(launch, "proxy_sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    base, experts, antis = _inputs(3, 200, seed=5)
    kw = dict(temperature=torch.full((3,), 0.9, device=DEVICE), top_k=torch.zeros(3, dtype=torch.int64, device=DEVICE),
              top_p=torch.tensor([0.9, 1.0, 0.8], device=DEVICE), min_p=torch.zeros(3, device=DEVICE), seed=3)  # fmt: skip
    tokens = sample(base, experts, antis, backend="triton", filters_used=frozenset({"top_p"}), **kw)
    assert (seen[0]["has_top_k"], seen[0]["has_top_p"], seen[0]["has_min_p"], seen[0]["write_logprobs"]) == (
        False, True, False, False)  # fmt: skip
    assert tokens.tolist() == sample(base, experts, antis, backend="reference", **kw).tolist()


@pytest.mark.parametrize("flag", ["has_top_k", "has_top_p", "has_min_p", "write_logprobs"])
def test_each_constexpr_switch_runs_in_the_interpreter(flag):
    # With the filter off in every row, compiling it out changes nothing; without logprobs, the tokens stay.
    base, experts, antis = _inputs(3, 300, seed=21)
    on = dict(top_k=0, top_p=1.0, min_p=0.0)
    on.update({"has_top_k": dict(top_p=0.9), "has_top_p": dict(top_k=20), "has_min_p": dict(top_k=20, top_p=0.9),
               "write_logprobs": dict(top_k=20, top_p=0.9, min_p=0.01)}[flag])  # fmt: skip
    args = _normalized(base, experts, antis, temperature=0.9, **on)
    expected = _check(args, block=64, split=2, cap=256)
    tokens, logprobs = proxy_sample(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size, block=64, split=2, cap=256, **{flag: False},
    )  # fmt: skip
    assert tokens.tolist() == expected[0].tolist()
    if flag != "write_logprobs":
        assert logprobs.tolist() == expected[1].tolist()
    else:  # only the fully-masked marker: 0 for every live row
        assert logprobs.tolist() == [0.0] * 3


def test_auto_picks_the_triton_kernel_only_once_verified_on_a_gpu():
    from proxytune._verified import GPU_VERIFIED

    cuda = torch.device("cuda")
    if GPU_VERIFIED and torch.cuda.is_available():
        assert backends.resolve("auto", cuda).name == "triton"
    elif not GPU_VERIFIED:
        assert backends.resolve("auto", cuda).name == "reference"  # no GPU needed to resolve
        assert not make_backend().serves(cuda, auto=True) and make_backend().serves(cuda)


def test_public_api_backend_choice():
    base, experts, antis = _inputs(2, 90, seed=14)
    tokens = sample(base, experts, antis, seed=5, top_p=0.9, backend="triton")
    assert tokens.tolist() == sample(base, experts, antis, seed=5, top_p=0.9, backend="reference").tolist()
    if DEVICE == "cpu":
        assert backends.resolve("auto", torch.device("cpu")).name != "triton"
        assert backends.resolve("triton", torch.device("cpu")).name == "triton"  # only under the interpreter


# ---- GPU: real sizes and CUDA graphs (skipped cleanly without a CUDA device) ------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("batch, width, dtype", [(1, 262144, torch.bfloat16), (256, 32000, torch.float16),
                                                 (64, 151936, torch.bfloat16), (8, 128256, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("temperature, top_k, top_p, min_p", FILTERS[:6])
def test_cuda_real_sizes(batch, width, dtype, temperature, top_k, top_p, min_p):
    base, experts, antis = proxy_inputs(batch, width, 1, dtype, "cuda", seed=width % 97, expert_width=width + 128)
    args = _normalized(base, experts, antis, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       seed=torch.arange(batch, device="cuda") * 31 + 1)  # fmt: skip
    tokens, logprobs = proxy_sample(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size,
    )  # fmt: skip
    ref_tokens, ref_logprobs = sample_reference(
        args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
        args.min_p, args.seed, args.step, args.vocab_size,
    )  # fmt: skip
    # fused multiply-adds and approximate exp/log may flip a draw whose keys tie within ulps: allow one row
    mismatches = (tokens != ref_tokens).sum().item()
    assert mismatches <= max(1, batch // 100)
    same = tokens == ref_tokens
    torch.testing.assert_close(logprobs[same], ref_logprobs[same], atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_flat_rows_use_the_exact_fallback():
    batch, width = 4, 50000
    base = torch.zeros(batch, width, device="cuda")
    base[:, ::7] = 0.5
    for params in (dict(top_k=100), dict(top_p=0.5), dict(top_k=1000, top_p=0.9), dict()):
        args = _normalized(base, [], [], **params)
        tokens, logprobs = proxy_sample(
            args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k,
            args.top_p, args.min_p, args.seed, args.step, args.vocab_size,
        )  # fmt: skip
        ref_tokens, ref_logprobs = sample_reference(
            args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k,
            args.top_p, args.min_p, args.seed, args.step, args.vocab_size,
        )  # fmt: skip
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_graph_capture_and_replay_with_new_parameters():
    batch, width = 8, 32000
    base, experts, antis = proxy_inputs(batch, width, 1, torch.bfloat16, "cuda", seed=21)
    args = _normalized(base, experts, antis, validate=False, top_k=torch.full((batch,), 50, device="cuda"),
                       top_p=torch.full((batch,), 0.9, device="cuda"), seed=torch.arange(batch, device="cuda"),
                       step=torch.zeros(batch, dtype=torch.int64, device="cuda"),
                       temperature=torch.ones(batch, device="cuda"))  # fmt: skip

    def step():
        return proxy_sample(
            args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
            args.min_p, args.seed, args.step, args.vocab_size,
        )  # fmt: skip

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compiles and allocates the scratch outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_tokens, out_logprobs = step()
    for i in range(4):
        args.step.fill_(i)
        args.temperature.copy_(torch.linspace(0.0, 1.5, batch, device="cuda"))
        args.top_k.fill_(10 * i)
        args.top_p.fill_(1.0 - 0.1 * i)
        base.copy_(proxy_inputs(batch, width, 1, torch.bfloat16, "cuda", seed=100 + i)[0])
        graph.replay()
        ref_tokens, ref_logprobs = sample_reference(
            args.base, args.experts, args.anti_experts, args.weights, args.temperature, args.top_k, args.top_p,
            args.min_p, args.seed, args.step, args.vocab_size,
        )  # fmt: skip
        assert (out_tokens != ref_tokens).sum().item() <= 1
        same = out_tokens == ref_tokens
        torch.testing.assert_close(out_logprobs[same], ref_logprobs[same], atol=1e-4, rtol=1e-4)


# ---- temperatures whose reciprocal overflows fp32 (T <= 2.9e-39), and other extreme temperatures ------------

TINY_TEMPERATURES = [1e-39, 2.9e-39, 1e-45, 1e-30]  # 1e-45: the smallest subnormal; 1e-30: 1/T still finite
# The interpreter's cost grows with the rows: the default suite takes the first case where 1/T overflows,
# the slow suite every tiny temperature.
TINY_SETS = [pytest.param([2.9e-39], id="2.9e-39"), pytest.param(TINY_TEMPERATURES, id="all", marks=pytest.mark.slow)]


def _extreme_temperature_rows(temperature, width=120, seed=15):
    """Rows where ``z = (s - m) / T`` is 0 at the maximum and -inf (or huge) elsewhere, and rows of logits on
    the scale of T itself (subnormal), where z is an ordinary spread: the division must be the reference's."""
    g = torch.Generator().manual_seed(seed)
    t32 = float(torch.tensor(temperature, dtype=torch.float32))
    unit, levels = 0.1, 40  # T = inf or NaN: any scale
    if math.isfinite(t32):
        unit = max(t32 / 10, 2.0**-149)  # z = k * unit / T: k / 10 (or k for the smallest subnormal T)
        levels = max(1, round(4 * t32 / unit))  # z spread over about [-4, 0]
    normal = torch.randn(2, width, generator=g) * 3
    normal[1, [5, 50, 110]] = normal[1].max() + 1.0  # three tokens tied at the maximum: the noise decides
    tiny = (torch.randint(-levels, 1, (2, width), generator=g).double() * unit).float()
    tiny[1, torch.rand(width, generator=g) < 0.3] = float("-inf")
    return torch.cat([normal, tiny]).to(DEVICE)


def _rows_for(temperatures, device=None):
    """The rows of :func:`_extreme_temperature_rows` for every temperature, stacked, with a per-row
    temperature tensor (one launch covers them all: the interpreter is slow)."""
    blocks = [_extreme_temperature_rows(t) for t in temperatures]
    base = torch.cat(blocks).to(device or DEVICE)
    per_row = torch.tensor([t for t, b in zip(temperatures, blocks) for _ in range(b.shape[0])], device=base.device)
    return base, per_row


@pytest.mark.parametrize("temperatures", TINY_SETS)
@pytest.mark.parametrize("top_k, top_p, min_p", [(0, 1.0, 0.0), (0, 0.9, 0.0), (5, 1.0, 0.0), (20, 0.8, 0.05)])
def test_tiny_temperatures_match_the_reference(top_k, top_p, min_p, temperatures):
    base, temperature = _rows_for(temperatures)
    rows = base.shape[0]
    args = _normalized(base, [], [], validate=False, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       seed=torch.arange(rows, device=DEVICE) + 11)  # fmt: skip
    for block, split, cap in ((32, 3, 256), (64, 2, FORCE_FALLBACK)):  # the candidate path, the exact fallback
        tokens, logprobs = _check(args, block=block, split=split, cap=cap)
        assert not torch.isnan(logprobs).any()


@pytest.mark.parametrize("temperatures", TINY_SETS)
def test_tiny_temperatures_through_the_public_api(temperatures):
    # validated: a false "every token is masked" error before; unvalidated: token 2^31 - 1 and NaN before
    base, per_row = _rows_for(temperatures)
    scalar = _extreme_temperature_rows(temperatures[0])
    for rows, t, validate in ((scalar, temperatures[0], True), (base, per_row, False)):
        kw = dict(temperature=t, top_p=0.9, seed=3, return_logprobs=True, validate=validate)
        tokens, logprobs = sample(rows, backend="triton", **kw)
        ref_tokens, ref_logprobs = sample(rows, backend="reference", **kw)
        assert tokens.tolist() == ref_tokens.tolist()
        torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("temperatures", TINY_SETS)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_extreme_unvalidated_temperatures_agree_on_every_backend(backend, temperatures):
    """Unvalidated T = +inf (uniform over the live tokens: logprob -log n; the cpu backend gave NaN), NaN
    (greedy, docs/semantics.md section 7) and T whose 1/T overflows: every backend gives the reference's tokens."""
    if backend == "cpu":
        from proxytune._cpu_backend import why_unavailable

        if why_unavailable() is not None:
            pytest.skip(f"cpu backend not built: {why_unavailable()}")
    device = "cpu" if backend == "cpu" else DEVICE
    rows, temperature = _rows_for([math.inf, math.nan, *temperatures], device)
    n = rows.shape[0]
    base = torch.cat([rows, rows])  # each row without filters, then with all three
    per_row = lambda off, on, dt=torch.float32: torch.tensor([off] * n + [on] * n, dtype=dt, device=device)  # noqa: E731
    temperature = torch.cat([temperature, temperature])
    kw = dict(
        temperature=temperature, top_k=per_row(0, 20, torch.int64), top_p=per_row(1.0, 0.8),
        min_p=per_row(0.0, 0.05), seed=torch.arange(2 * n, device=device) + 1, validate=False, return_logprobs=True,
    )  # fmt: skip
    tokens, logprobs = sample(base, backend=backend, **kw)
    ref_tokens, ref_logprobs = sample(base, backend="reference", **kw)
    assert tokens.dtype == torch.int64 and ((tokens >= 0) & (tokens < base.shape[1])).all()
    assert tokens.tolist() == ref_tokens.tolist()
    assert not torch.isnan(logprobs).any()  # no row is fully masked
    torch.testing.assert_close(logprobs, ref_logprobs, atol=2e-5, rtol=2e-5)
    inf, nan = temperature == math.inf, torch.isnan(temperature)
    assert inf.any() and nan.any()
    # T = inf: z = 0 for every live token, and the filters keep whole tie groups
    n_live = torch.isfinite(base[inf]).sum(dim=1).double()
    torch.testing.assert_close(logprobs[inf].double(), -torch.log(n_live), atol=2e-5, rtol=2e-5)
    # NaN: greedy, the first maximum, logprob 0
    assert tokens[nan].tolist() == base[nan].argmax(dim=1).tolist() and (logprobs[nan] == 0).all()

"""``proxytune.sample`` on every available backend against the naive pipeline (:mod:`benchmarks.naive`).

Cases: B in {1, 8, 32} x V in {32000 (Llama-2), 128256 (Llama-3), 152064 (Qwen2)} x {fp32, bf16}, one expert
pair, temperature 0.7, top-p 0.9, on realistic peaked logits (:func:`proxytune.testing.proxy_inputs`); plus
top-p 1.0 (no nucleus) at V = 128256 in fp32 and bf16. CPU always; CUDA too when a GPU is present. And the C++
op's batch flag: with and without log-probabilities (``cpu+lp`` / ``cpu-lp``), B in {1, 8}, V = 128256, fp32,
top-p 0.9 and 1.0, the variants alternated call by call (``-k logprobs``).

Backends: ``naive`` and every registered backend that ``auto`` may pick for the device (so the C++ and
Triton backends appear once they are registered; the Triton interpreter on the CPU is not timed) plus
``reference``. One that serves the device but cannot run here is skipped with its reason.

Rounds adapt to the speed of each backend: about ``PROXYTUNE_BENCH_TIME`` seconds (default 0.5) per
benchmark, at least 3 and at most 200 rounds, after
one or two warm-up calls (one when a call takes more than a quarter of that time). Timings are not asserted; the
tokens are (every id must lie in ``[0, V)``).
"""

from __future__ import annotations

import functools
import os
import time

import pytest
import torch

import proxytune
from conftest import Record
from naive import naive_sample
from proxytune import backends
from proxytune.testing import proxy_inputs

BATCHES = (1, 8, 32)
VOCABS = (32000, 128256, 152064)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEMPERATURE, WEIGHT, SEED = 0.7, 1.0, 1234
TARGET_S = float(os.environ.get("PROXYTUNE_BENCH_TIME", "0.5"))
MIN_ROUNDS, MAX_ROUNDS = 3, 200

# (dtype, B, V, top_p): the full matrix at top-p 0.9, and top-p 1.0 (no sort in naive, no nucleus) at one V.
CASES = [(dt, b, v, 0.9) for dt in DTYPES for v in VOCABS for b in BATCHES]
CASES += [(dt, b, 128256, 1.0) for dt in DTYPES for b in BATCHES]


def _backend_params(device_type: str) -> list:
    """``naive`` and the registered backends worth timing on ``device_type``, unavailable ones skipped."""
    device = torch.device(device_type)
    params = [pytest.param("naive", id="naive")]
    for name in backends.names():
        impl = _registered(name)
        if not (impl.serves(device, auto=True) or name == "reference"):
            continue
        reason = impl.why_unavailable() if device_type != "cuda" or torch.cuda.is_available() else None
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")] if reason else []
        params.append(pytest.param(name, id=name, marks=marks))
    return params


def _registered(name: str) -> backends.Backend:
    return backends._REGISTRY[name]  # the registry has no public getter; resolve() raises where we want to skip


def _params() -> list:
    params = []
    for device_type in ("cpu", "cuda"):
        device_marks = []
        if device_type == "cuda":
            device_marks = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
        for dtype, batch, vocab, top_p in CASES:
            for backend in _backend_params(device_type):
                (name,) = backend.values
                params.append(pytest.param(
                    device_type, dtype, batch, vocab, top_p, name,
                    marks=[*device_marks, *backend.marks],
                    id=f"{device_type}-{dtype}-B{batch}-V{vocab}-p{top_p:g}-{name}",
                ))  # fmt: skip
    return params


@functools.lru_cache(maxsize=2)  # consecutive benchmarks share a case: keep its inputs, free the rest
def _inputs(device_type: str, dtype: str, batch: int, vocab: int):
    seed = 1000 * batch + vocab
    return proxy_inputs(batch, vocab, n_pairs=1, dtype=DTYPES[dtype], device=device_type, seed=seed)


def _sync(device_type: str) -> None:
    if device_type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device_type, dtype, batch, vocab, top_p, backend", _params())
def test_sample(benchmark, bench_run, device_type, dtype, batch, vocab, top_p, backend):
    base, experts, antis = _inputs(device_type, dtype, batch, vocab)
    device = base.device
    bench_run.copy_bandwidth(device)  # probe once per device, before the first timing

    if backend == "naive":
        generator = torch.Generator(device=device).manual_seed(SEED)

        def call():
            return naive_sample(base, experts, antis, WEIGHT, TEMPERATURE, top_p, generator=generator)
    else:

        def call():
            return proxytune.sample(
                base, experts, antis, weights=WEIGHT, temperature=TEMPERATURE, top_p=top_p,
                seed=SEED, step=0, backend=backend, validate=False,
            )  # fmt: skip

    def timed():  # the host waits for the device, so a round is the op's latency
        tokens = call()
        _sync(device_type)
        return tokens

    start = time.perf_counter()
    tokens = timed()  # first call: lazy initialisation, caches
    per_call = time.perf_counter() - start
    if per_call < TARGET_S / 4:  # a second warm-up, unless the backend is so slow that it costs seconds
        start = time.perf_counter()
        tokens = timed()
        per_call = time.perf_counter() - start
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(per_call, 1e-9))))

    benchmark.group = f"{device_type} {dtype} top_p={top_p:g} B={batch} V={vocab}"
    benchmark.extra_info.update(device=device_type, dtype=dtype, batch=batch, vocab=vocab, top_p=top_p)
    tokens = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)

    assert tokens.dtype == torch.int64 and tuple(tokens.shape) == (batch,), (tokens.dtype, tokens.shape)
    assert bool(((tokens >= 0) & (tokens < vocab)).all()), f"{backend} returned ids outside [0, {vocab}): {tokens}"

    if benchmark.stats is not None:  # None with --benchmark-disable
        stats = benchmark.stats.stats
        bench_run.records.append(Record(
            device=device_type, dtype=dtype, batch=batch, vocab=vocab, top_p=top_p, backend=backend,
            median_s=stats.median, min_s=stats.min, mean_s=stats.mean, stddev_s=stats.stddev, rounds=stats.rounds,
            floor_bytes=3 * batch * vocab * base.element_size(),
            times_s=list(stats.data),
        ))  # fmt: skip


# ---- the host-known batch flags of the C++ op (issue 22): log-probabilities computed or not -----------------
FLAG_VOCAB, FLAG_BATCHES, FLAG_ROUNDS = 128256, (1, 8), int(os.environ.get("PROXYTUNE_BENCH_FLAG_ROUNDS", "60"))
# variant -> (return_logprobs, filters_used): what the engine passes when no request asks for log-probabilities
FLAG_VARIANTS = {"cpu+lp": (True, None), "cpu-lp": (False, None)}


@pytest.mark.parametrize("top_p", [0.9, 1.0], ids=lambda p: f"p{p:g}")
@pytest.mark.parametrize("batch", FLAG_BATCHES, ids=lambda b: f"B{b}")
def test_cpu_op_with_and_without_logprobs(bench_run, batch, top_p):
    # The variants alternate call by call (one round = one call of each), so a machine whose load changes
    # during the run slows them alike; the medians are compared. top_p=0.9 needs the row's exp-sum anyway
    # (the nucleus), so only the kept set's sum is saved; top_p=1.0 (no filter) saves the whole exp-sum pass.
    if _registered("cpu").why_unavailable() is not None:
        pytest.skip(f"backend 'cpu' unavailable: {_registered('cpu').why_unavailable()}")
    base, experts, antis = _inputs("cpu", "fp32", batch, FLAG_VOCAB)
    bench_run.copy_bandwidth(base.device)
    params = dict(weights=WEIGHT, temperature=TEMPERATURE, top_p=top_p, seed=SEED, step=0, backend="cpu", validate=False)
    times: dict[str, list[float]] = {name: [] for name in FLAG_VARIANTS}
    outputs = {}
    for round_ in range(FLAG_ROUNDS + 2):  # two warm-up rounds
        for name, (logprobs, used) in FLAG_VARIANTS.items():
            start = time.perf_counter()
            out = proxytune.sample(base, experts, antis, return_logprobs=logprobs, filters_used=used, **params)
            if round_ >= 2:
                times[name].append(time.perf_counter() - start)
            outputs[name] = out[0] if logprobs else out
    assert torch.equal(outputs["cpu+lp"], outputs["cpu-lp"])  # the flag changes no token
    for name, ts in times.items():
        ts_sorted = sorted(ts)
        median = ts_sorted[len(ts) // 2]
        mean = sum(ts) / len(ts)
        bench_run.records.append(Record(
            device="cpu", dtype="fp32", batch=batch, vocab=FLAG_VOCAB, top_p=top_p, backend=name, median_s=median,
            min_s=ts_sorted[0], mean_s=mean, stddev_s=(sum((t - mean) ** 2 for t in ts) / len(ts)) ** 0.5,
            rounds=len(ts), floor_bytes=3 * batch * FLAG_VOCAB * base.element_size(), times_s=ts,
        ))  # fmt: skip

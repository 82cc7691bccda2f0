"""``torch.compile`` traces through the C++ ops: their Meta kernels (csrc/) give FakeTensor the output shapes.

A graph that calls ``torch.ops.proxytune.sample`` / ``combine`` compiles in one piece (``fullgraph=True``)
and the compiled function returns what the eager op returns, tokens and log-probabilities bit for bit. The
``aot_eager`` backend traces with fake tensors exactly as inductor would, without generating C++ for the
rest of the graph (seconds instead of a minute on two cores); ``opcheck`` checks the schema and the fake
kernel against the real one.
"""

from __future__ import annotations

import pytest
import torch

from proxytune._cpu_backend import why_unavailable

pytestmark = pytest.mark.skipif(why_unavailable() is not None, reason="the cpu backend is not built")


def _args(B: int = 3, V: int = 5003, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, V, generator=g) * 3
    expert = (torch.randn(B, V + 7, generator=g) * 3).to(torch.bfloat16)
    anti = torch.randn(B, V, generator=g) * 3
    weights = torch.rand(1, B, generator=g) * 2 - 0.5
    rows = {
        "temperature": torch.tensor([0.7, 1.0, 0.0][:B] + [1.0] * max(0, B - 3)),
        "top_k": torch.tensor([0, 40, 0][:B] + [0] * max(0, B - 3)),
        "top_p": torch.tensor([0.9, 1.0, 1.0][:B] + [0.9] * max(0, B - 3)),
        "min_p": torch.tensor([0.0, 0.0, 0.05][:B] + [0.0] * max(0, B - 3)),
        "seed": torch.randint(-(2**62), 2**62, (B,), generator=g),
        "step": torch.randint(0, 1000, (B,), generator=g),
    }
    return base, [expert], [anti], weights, rows, V


def test_sample_and_combine_compile_in_one_graph():
    base, experts, antis, weights, rows, V = _args()

    def step(base, expert, anti, weights, t, k, p, mp, seed, step):
        s = torch.ops.proxytune.combine(base, [expert], [anti], weights, V)
        tokens, logprobs = torch.ops.proxytune.sample(base, [expert], [anti], weights, t, k, p, mp, seed, step, V)
        return tokens + 1, logprobs * 2, s.amax(dim=1)

    args = (base, experts[0], antis[0], weights, *rows.values())
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got, want = compiled(*args), step(*args)
    assert got[0].dtype == torch.int64 and got[0].shape == (3,)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[2], want[2])


def test_fake_tensors_get_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    base, experts, antis, weights, rows, V = _args(B=4, V=777)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (base, experts[0], antis[0], weights, *rows.values())]
        tokens, logprobs = torch.ops.proxytune.sample(fake[0], [fake[1]], [fake[2]], fake[3], *fake[4:], V)
        s = torch.ops.proxytune.combine(fake[0], [fake[1]], [fake[2]], fake[3], V)
    assert (tokens.shape, tokens.dtype, tokens.device.type) == ((4,), torch.int64, "cpu")
    assert (logprobs.shape, logprobs.dtype) == ((4,), torch.float32)
    assert (s.shape, s.dtype) == ((4, 777), torch.float32)


def test_opcheck_schema_and_fake_kernel():
    base, experts, antis, weights, rows, V = _args(B=2, V=300)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.proxytune.combine.default, (base, experts, antis, weights, V), test_utils=tests)
    torch.library.opcheck(
        torch.ops.proxytune.sample.default, (base, experts, antis, weights, *rows.values(), V), test_utils=tests
    )

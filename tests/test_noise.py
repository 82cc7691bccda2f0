"""The counter-based noise: Philox-4x32-10 known answers, the uniform's exact form, and its purity."""

import pytest
import torch

from proxytune.noise import gumbel, philox4x32_10, uniform

# Random123's published known-answer vectors for philox4x32_10: (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    as_t = lambda xs: [torch.tensor(x, dtype=torch.int64) for x in xs]  # noqa: E731
    out = philox4x32_10(*as_t(counter), *as_t(key))
    assert [int(x) for x in out] == list(expected)


def test_uniform_is_the_specified_function_of_the_first_word():
    seed = torch.tensor(0x299F31D0A4093822)
    step = torch.tensor(0x0370734413198A2E)  # (c2, c3) = (0x13198A2E, 0x03707344)
    token = torch.tensor(0x243F6A88)  # c1 must be 0 for the uniform, so compare against a direct Philox call
    x0 = philox4x32_10(token, torch.tensor(0), step & 0xFFFFFFFF, step >> 32, seed & 0xFFFFFFFF, seed >> 32)[0]
    assert uniform(seed, step, token).item() == ((int(x0) >> 9) + 0.5) * 2.0**-23


def test_uniform_is_exact_and_strictly_inside_the_unit_interval():
    u = uniform(torch.tensor(7), torch.tensor(3), torch.arange(200_000))
    assert u.dtype == torch.float32
    k = u.double() * 2**23 - 0.5
    assert torch.equal(k, k.round()) and k.min() >= 0 and k.max() <= 2**23 - 1
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    assert torch.isfinite(gumbel(torch.tensor(7), torch.tensor(3), torch.arange(200_000))).all()


def test_noise_depends_only_on_seed_step_and_token():
    tokens = torch.arange(5000)
    a = uniform(torch.tensor(11), torch.tensor(5), tokens)
    b = uniform(torch.full((5000,), 11), torch.full((5000,), 5), tokens)
    assert torch.equal(a, b)
    for other in [uniform(torch.tensor(12), torch.tensor(5), tokens), uniform(torch.tensor(11), torch.tensor(6), tokens)]:
        assert (other != a).float().mean() > 0.99
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < 0.05


def test_seed_and_step_use_all_64_bits():
    tokens = torch.arange(1000)
    lo = uniform(torch.tensor(1), torch.tensor(0), tokens)
    hi = uniform(torch.tensor(1 + 2**32), torch.tensor(0), tokens)
    neg = uniform(torch.tensor(-1), torch.tensor(2**40), tokens)
    assert (lo != hi).float().mean() > 0.99 and (lo != neg).float().mean() > 0.99
    assert not torch.equal(uniform(torch.tensor(1), torch.tensor(2**32), tokens), lo)

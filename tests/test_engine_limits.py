"""The engine at its limits: position limits, very large ``max_new_tokens``, requests that interleave.

* A row ends with finish reason ``"length"`` when prompt and new tokens fill the smallest position limit of
  the models (GPT-2's ``n_positions`` would otherwise be an IndexError mid-batch that loses every row; a
  Llama would silently run past ``max_position_embeddings``); a prompt that already fills it is a clear error.
* The static decoder's caches are bounded by that limit and grow as a request needs them, so
  ``max_new_tokens=10**8`` costs what the answer uses.
* Each request keeps its own state: a paused stream, another request on the same tuner, then the stream
  again gives the eager tokens, in every decode mode.
"""

import pytest
import torch

from proxytune import ProxyTuner
from proxytune.engine import static_decoder
from tiny_models import PROMPTS, tiny_config

MODES = ("eager", "static")


def short_model(kind: str, positions: int, seed: int):
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind)
    if kind == "gpt2":
        config.n_positions = positions
    else:
        config.max_position_embeddings = positions
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def short():
    return {kind: tuple(short_model(kind, 24, s) for s in (0, 1, 2)) for kind in ("gpt2", "llama")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_rows_end_at_the_position_limit(kind, mode, short, tok):
    base, expert, anti = short[kind]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, decode=mode, eos_token_ids=[], poll_every=4)
    prompts = [PROMPTS[0], PROMPTS[1]]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    gens = tuner.generate(prompts, temperature=0.0, max_new_tokens=10**8)
    assert [len(g.token_ids) for g in gens] == [24 - n for n in lengths]
    assert [g.finish_reason for g in gens] == ["length", "length"]
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", eos_token_ids=[])
    assert [g.token_ids for g in gens] == [g.token_ids for g in eager.generate(prompts, temperature=0.0, max_new_tokens=30)]
    # a smaller max_new_tokens still wins
    assert [len(g.token_ids) for g in tuner.generate(prompts, temperature=0.0, max_new_tokens=3)] == [3, 3]


def test_a_prompt_that_fills_the_position_limit_is_refused_up_front(short, tok):
    base, expert, anti = short["gpt2"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    long_prompt = " ".join(["hello world"] * 20)
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens for base .* at most 24 positions"):
        tuner.generate([PROMPTS[0], long_prompt], max_new_tokens=5)
    assert tuner.generate([long_prompt], max_new_tokens=0)[0].finish_reason == "length"  # nothing to run


def test_static_caches_are_bounded_and_grow_as_needed(short, tok, monkeypatch):
    from tiny_models import tiny_trio

    base, expert, anti = short["llama"]  # 24 positions
    static = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static", poll_every=4)
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager")
    kw = dict(temperature=0.9, seed=3)
    gens = static.generate(PROMPTS, max_new_tokens=10**8, **kw)  # was a 10**8-position allocation
    assert static.decoder_stats().max_len <= 24 + static_decoder.SPARE_STEPS + 32  # bounded by the model (rounded up)
    assert [g.token_ids for g in gens] == [g.token_ids for g in eager.generate(PROMPTS, max_new_tokens=10**8, **kw)]

    base, expert, anti = tiny_trio("llama")  # 512 positions
    monkeypatch.setattr(static_decoder, "STATIC_INITIAL_STEPS", 8)
    grown = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static", poll_every=4, eos_token_ids=[])
    kw = dict(temperature=0.0, max_new_tokens=70)
    want = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", eos_token_ids=[]).generate(PROMPTS, **kw)
    got = grown.generate(PROMPTS, **kw)
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    assert grown.decoder_stats().max_len >= max(len(tok(p)["input_ids"]) for p in PROMPTS) + 70  # it grew from ~8 + 16


@pytest.mark.parametrize("mode", MODES)
def test_a_paused_stream_and_other_requests_keep_their_own_state(mode, tok):
    from tiny_models import tiny_trio

    base, expert, anti = tiny_trio("llama")
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, decode=mode, poll_every=3, eos_token_ids=[])
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", eos_token_ids=[])
    kw_a = dict(temperature=1.0, seed=7, max_new_tokens=30)
    kw_b = dict(temperature=0.8, seed=8, max_new_tokens=30)
    want_a = eager.generate(PROMPTS[:2], **kw_a)
    want_b = eager.generate(PROMPTS[2:], **kw_b)

    stream = tuner.stream(PROMPTS[:2], **kw_a)
    first = [next(stream) for _ in range(9)]
    assert [g.token_ids for g in tuner.generate(PROMPTS[2:], **kw_b)] == [g.token_ids for g in want_b]
    events = first + list(stream)
    assert [[e.token_id for e in events if e.index == i] for i in (0, 1)] == [g.token_ids for g in want_a]

    # two streams interleaved token by token
    a, b = tuner.stream(PROMPTS[:2], **kw_a), tuner.stream(PROMPTS[2:], **kw_b)
    got_a, got_b, done = [], [], [False, False]
    while not all(done):
        for k, (it, out) in enumerate(((a, got_a), (b, got_b))):
            if not done[k]:
                try:
                    out.append(next(it))
                except StopIteration:
                    done[k] = True
    assert [[e.token_id for e in got_a if e.index == i] for i in (0, 1)] == [g.token_ids for g in want_a]
    assert [[e.token_id for e in got_b if e.index == i] for i in (0, 1)] == [g.token_ids for g in want_b]
    # the kept decoder is free again for the next request
    assert mode == "eager" or not tuner.decoder_stats().in_use

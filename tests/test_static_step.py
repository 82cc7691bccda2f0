"""The static decode step (``decode="static"``), run eagerly on the CPU, against the eager engine.

Same tokens for the same seeds (greedy and sampled), log-probabilities to float precision, several batch-size
buckets with padded rows, per-row stops with compaction, streaming, reuse of the decoder between batches, and a
clear fallback for models the static step cannot run. Tiny random-weight Llama / Qwen2 / GPT-2 models.
"""

import pytest
import torch

from proxytune import ProxyTuner, SamplingParams
from proxytune.engine.runner import ModelRunner
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.prompts import left_pad
from proxytune.engine.static_decoder import StaticDecoder, bucket_for, static_support
from tiny_models import EOS_ID, KINDS, PROMPTS, tiny_trio

N_NEW = 10


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_trio(kind) for kind in KINDS}


def pair(models, tok, kind, poll_every=3, **kw):
    base, expert, anti = models[kind]
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", **kw)
    static = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static", poll_every=poll_every, **kw)
    return eager, static


def assert_same(a, b):
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.text for g in a] == [g.text for g in b]
    for x, y in zip(a, b):
        if x.logprobs is not None:
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_static_step_gives_the_eager_tokens(kind, models, tok):
    eager, static = pair(models, tok, kind)
    prompts = PROMPTS + [PROMPTS[1].upper()]  # 5 rows: bucket 8, three padded rows
    params = [
        SamplingParams(temperature=0, max_new_tokens=N_NEW),
        SamplingParams(temperature=1.0, max_new_tokens=N_NEW, seed=11),
        SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=N_NEW, seed=12),
        SamplingParams(temperature=1.2, top_k=20, min_p=0.05, max_new_tokens=N_NEW, seed=13, weights=0.5),
        SamplingParams(temperature=0.7, max_new_tokens=N_NEW, seed=14),
    ]
    assert_same(eager.generate(prompts, params, return_logprobs=True), static.generate(prompts, params, return_logprobs=True))
    # 3 rows (bucket 4, one padded row), another seed, and the decoder kept from the first batch
    kw = dict(temperature=1.0, max_new_tokens=N_NEW + 4, seed=5)
    assert_same(eager.generate(PROMPTS[:3], **kw), static.generate(PROMPTS[:3], **kw))
    assert static.decoder_stats().capacity == 8  # reused: 3 rows fit the first decoder
    static.release_decode_buffers()
    assert static.decoder_stats() is None
    assert_same(eager.generate(PROMPTS[:1], **kw), static.generate(PROMPTS[:1], **kw))
    assert static.decoder_stats().capacity == 1 and not static.decoder_stats().in_use


@pytest.mark.parametrize("poll_every", [1, 4])
def test_per_row_stops_compaction_and_streaming(poll_every, models, tok):
    eager, static = pair(models, tok, "llama", poll_every=poll_every, eos_token_ids=[EOS_ID])
    reference = eager.generate(PROMPTS, temperature=0, max_new_tokens=12)
    stop = tok.decode(reference[3].token_ids[:5], skip_special_tokens=True)[-2:]
    eos = frozenset({EOS_ID, reference[2].token_ids[6]})
    eager.eos_token_ids = static.eos_token_ids = eos
    params = [
        SamplingParams(temperature=0, max_new_tokens=2),
        SamplingParams(temperature=0.9, max_new_tokens=12, seed=3),
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=0, max_new_tokens=12, stop=["never appears", stop]),
        SamplingParams(max_new_tokens=0),
        SamplingParams(temperature=0, max_new_tokens=1),
    ]
    prompts = PROMPTS + PROMPTS[:2]
    sizes = []
    handle = static.base.module.register_forward_pre_hook(
        lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = static.generate(prompts, params, return_logprobs=True)
        events = list(static.stream(prompts, params, return_logprobs=True))
    finally:
        handle.remove()
    want = eager.generate(prompts, params, return_logprobs=True)
    assert_same(want, got)
    assert [g.finish_reason for g in got][:4] == ["length", "length", "eos", "stop"]
    assert [(e.index, e.token_id, e.text, e.finish_reason) for e in events] == [
        (e.index, e.token_id, e.text, e.finish_reason) for e in eager.stream(prompts, params, return_logprobs=True)
    ]
    decode = sizes[1 : len(sizes) // 2]  # one generate: the prefill, then the decode steps
    assert set(decode) <= {1, 2, 4, 8} and decode == sorted(decode, reverse=True)
    # 5 rows prefilled (bucket 8); the max_new_tokens=1 row ends on its first token, so the 4 others move to
    # bucket 4 before the first step, then to smaller buckets as they finish
    assert decode[0] == 4 and decode[-1] <= 2, decode


def test_padded_rows_do_not_touch_real_rows(models, tok):
    """The step's logits and tokens for rows [0, n) are the same in bucket n and in bucket 2n whose padded
    rows hold random tokens, positions and sampling parameters."""
    base, expert, anti = models["qwen2"]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    n = len(prompts)

    def run(capacity, garbage):
        dec = StaticDecoder([base, expert, anti], ["b", "e", "a"], capacity=capacity, max_len=32, vocab_size=320,
                            backend="reference", ring_len=4)  # fmt: skip
        runners = [ModelRunner(SimpleLoaded(m)) for m in (base, expert, anti)]
        for r in runners:
            r.prefill(*left_pad(prompts, 0, torch.device("cpu")))
        state = SamplerState.for_requests([SamplingParams(temperature=1.0, top_k=30)] * n, [7 + i for i in range(n)],
                                          weights=[1.0], device=torch.device("cpu"))  # fmt: skip
        first = torch.tensor([5, 6, 7, 8])
        state.step += 1
        dec.load(runners, state, first, 0)
        if garbage:
            g = torch.Generator().manual_seed(0)
            for m in dec.models:
                m.ids[n:] = torch.randint(0, 320, (capacity - n, 1), generator=g)
                m.pos[n:] = torch.randint(0, 20, (capacity - n, 1), generator=g)
            dec.sampler.temperature[n:] = 3.0
            dec.sampler.seed[n:] = torch.randint(0, 1000, (capacity - n,), generator=g)
        out = []
        for _ in range(3):
            logits = dec.step(capacity)
            out.append([x[:n].clone() for x in logits])
        return out, dec.ring[:3, :n].clone()

    (small, small_tokens), (big, big_tokens) = run(n, False), run(2 * n, True)
    assert torch.equal(small_tokens, big_tokens)
    for a, b in zip(small, big):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


class SimpleLoaded:
    """The part of ``LoadedModel`` a ``ModelRunner`` reads."""

    def __init__(self, module):
        self.module, self.device = module, next(module.parameters()).device


def test_static_logits_equal_eager_logits_at_every_position(models, tok):
    base = models["gpt2"][0]
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    eager, static_runner = ModelRunner(SimpleLoaded(base)), ModelRunner(SimpleLoaded(base))
    logits = eager.prefill(*left_pad(prompts, 0, torch.device("cpu")))
    static_runner.prefill(*left_pad(prompts, 0, torch.device("cpu")))
    dec = StaticDecoder([base], ["base"], capacity=4, max_len=64, vocab_size=320, backend="reference", ring_len=8)
    tokens = logits.argmax(-1)
    state = SamplerState.for_requests([SamplingParams(temperature=0)] * len(prompts), [0] * len(prompts), weights=[],
                                      device=torch.device("cpu"))  # fmt: skip
    state.step += 1
    dec.load([static_runner], state, tokens, 0)
    for _ in range(8):
        want = eager.step(tokens)
        got = dec.step(4)[0][:3]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        tokens = want.argmax(-1)
        assert torch.equal(dec.models[0].ids[:3, 0], tokens)


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 33, 512, 513)] == [1, 2, 4, 8, 8, 16, 64, 512, 1024]


def test_decode_modes_and_fallbacks(models, tok):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base, expert, anti = models["llama"]
    auto = ProxyTuner(base, expert, anti, tokenizer=tok)
    assert auto.decode == "eager" and "CUDA" in auto.decode_reason  # CPU: eager by default
    with pytest.raises(ValueError, match="decode must be"):
        ProxyTuner(base, tokenizer=tok, decode="fast")
    with pytest.raises(ValueError, match="poll_every"):
        ProxyTuner(base, tokenizer=tok, decode="static", poll_every=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            ProxyTuner(base, tokenizer=tok, decode="graph")
    torch.manual_seed(0)
    sliding = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=16, max_window_layers=1,
    )).eval()  # fmt: skip
    reason, _ = static_support([base, sliding], ["base", "expert 0"])
    assert "expert 0 has sliding_attention layers" in reason
    with pytest.raises(ValueError, match="decode='static' is not possible: expert 0 has sliding_attention"):
        ProxyTuner(base, sliding, anti, tokenizer=tok, decode="static")
    fallback = ProxyTuner(base, sliding, anti, tokenizer=tok)
    assert fallback.decode == "eager" and "sliding_attention" in fallback.decode_reason
    static = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static")
    kw = dict(temperature=0.9, max_new_tokens=4, seed=1)
    assert [g.token_ids for g in static.generate(PROMPTS, use_cache=False, **kw)] == [
        g.token_ids for g in auto.generate(PROMPTS, **kw)
    ]  # use_cache=False always decodes eagerly


def test_graph_bookkeeping_with_fake_cuda(models, tok, monkeypatch):
    """``DecodeGraphs``' control flow on a CPU: streams, pools and graphs are faked (a capture records the step
    and, like a real capture, leaves the state as it was; a replay runs the step). Warm-up, the timing of both
    variants, per-bucket capture and the restores around them must leave the tokens those of the eager engine."""
    import contextlib
    import types

    import proxytune.engine.decode_graphs as gs
    import proxytune.engine.static_decoder as ss

    capturing, decoders = [], []

    class FakeGraph:
        fn = None

        def replay(self):
            self.fn()

    @contextlib.contextmanager
    def fake_capture(graph, pool=None, stream=None):
        saved = decoders[-1].snapshot()
        capturing.append(graph)
        try:
            yield
        finally:
            capturing.pop()
            decoders[-1].restore(saved)  # a capture runs no kernel

    real_step, real_init = ss.StaticDecoder.step, gs.DecodeGraphs.__init__

    def step(self, b, return_logprobs=False, fork=None):
        if capturing:
            capturing[-1].fn = lambda: real_step(self, b, return_logprobs, fork)
        return real_step(self, b, return_logprobs, fork)

    def init(self, decoder, *args, **kwargs):
        decoders.append(decoder)
        device, decoder.device = decoder.device, types.SimpleNamespace(type="cuda")
        try:
            real_init(self, decoder, *args, **kwargs)
        finally:
            decoder.device = device

    class FakeStream:
        def wait_stream(self, other):
            pass

    for name, value in dict(Stream=FakeStream, current_stream=lambda *a: FakeStream(), CUDAGraph=FakeGraph,
                            stream=lambda s: contextlib.nullcontext(), device=lambda d: contextlib.nullcontext(),
                            graph_pool_handle=lambda: None, graph=fake_capture, synchronize=lambda *a: None).items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(ss.StaticDecoder, "step", step)
    monkeypatch.setattr(gs.DecodeGraphs, "__init__", init)

    base, expert, anti = models["llama"]
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", eos_token_ids=[EOS_ID])
    graph = ProxyTuner(base, expert, anti, tokenizer=tok, decode="static", eos_token_ids=[EOS_ID], poll_every=3)
    graph.decode = "graph"  # what decode="graph" uses on CUDA
    params = [SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=n, seed=i) for i, n in enumerate([2, 12, 4, 9, 1, 6])]
    prompts = (PROMPTS * 2)[:6]
    got = graph.generate(prompts, params, return_logprobs=True)
    assert_same(eager.generate(prompts, params, return_logprobs=True), got)
    stats = graph.decoder_stats()
    assert len(stats.graphs) >= 2 and all(lp for _, lp in stats.graphs), stats.graphs  # compaction: several buckets
    assert set(stats.graph_variants.values()) <= {"streams", "sequential"}
    assert all(len(t) == 2 for t in stats.graph_timings.values())


def test_dynamic_rope_is_refused_with_a_reason(models, tok):
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config

    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    torch.manual_seed(0)
    dynamic = AutoModelForCausalLM.from_config(config).eval()
    base, _, anti = models["llama"]
    reason, _ = static_support([base, dynamic], ["base", "expert 0"])
    assert reason is not None and "expert 0 uses dynamic RoPE scaling" in reason
    with pytest.raises(ValueError, match="decode='static' is not possible: expert 0 uses dynamic RoPE"):
        ProxyTuner(base, dynamic, anti, tokenizer=tok, decode="static")
    assert static_support([base, anti], ["base", "anti"])[0] is None  # default RoPE is fine

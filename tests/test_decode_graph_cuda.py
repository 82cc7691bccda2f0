"""CUDA graphs of the static decode step (``decode="graph"``): GPU only, ``python -m pytest -m cuda``.

Replayed logits equal eager logits for each model at several positions (both variants), greedy and seeded
sampled output identical to the eager engine, parameters changed between replays take effect, several buckets,
and side streams that always rejoin. Tiny random-weight models in fp32 (exact comparisons).

Written without a GPU at hand: these tests have not run yet.
"""

import pytest
import torch

from proxytune import ProxyTuner, SamplingParams
from proxytune.engine.runner import ModelRunner
from proxytune.engine.sampler_state import SamplerState
from proxytune.engine.prompts import left_pad
from tiny_models import EOS_ID, KINDS, PROMPTS

pytestmark = pytest.mark.cuda
N_NEW = 12


@pytest.fixture(scope="module")
def models(trios):
    return {kind: tuple(m.cuda() for m in trio) for kind, trio in trios.items()}


class Loaded:
    def __init__(self, module):
        self.module, self.device = module, next(module.parameters()).device


def loaded_decoder(trio, tok, capacity, prompts):
    """A ``StaticDecoder`` loaded with a prefilled batch, its first token drawn greedily from the base."""
    from proxytune.engine.static_decoder import StaticDecoder

    dev = torch.device("cuda")
    ids = [tok(p)["input_ids"] for p in prompts]
    runners = [ModelRunner(Loaded(m)) for m in trio]
    logits = [r.prefill(*left_pad(ids, 0, dev)) for r in runners]
    dec = StaticDecoder(list(trio), ["base", "expert 0", "anti-expert 0"], capacity=capacity, max_len=64,
                        vocab_size=320, backend="auto", ring_len=8)  # fmt: skip
    state = SamplerState.for_requests([SamplingParams(temperature=0.9, top_p=0.9)] * len(ids),
                                      [40 + i for i in range(len(ids))], weights=[1.0], device=dev)  # fmt: skip
    first = logits[0].argmax(-1)
    state.step += 1
    dec.load(runners, state, first, 0)
    return dec


@pytest.mark.parametrize("variant", ["streams", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_replayed_logits_equal_eager_logits(kind, variant, models, tok):
    from proxytune.engine.decode_graphs import DecodeGraphs

    trio = models[kind]
    eager, graphed = loaded_decoder(trio, tok, 4, PROMPTS[:3]), loaded_decoder(trio, tok, 4, PROMPTS[:3])
    graphs = DecodeGraphs(graphed, variant=variant)
    for position in range(10):
        want = [x.clone() for x in eager.step(4)]
        graphs.replay(4)
        got = graphs.logits(4)
        for k, (a, b) in enumerate(zip(got, want)):
            torch.testing.assert_close(a[:3], b[:3], atol=1e-5, rtol=1e-5, msg=lambda m: f"model {k} step {position}: {m}")
        assert torch.equal(graphed.models[0].ids[:3], eager.models[0].ids[:3])
        assert torch.equal(graphed.sampler.step, eager.sampler.step)
    assert graphs.chosen[(4, False)] == variant


def test_parameters_changed_between_replays_take_effect(models, tok):
    from proxytune import combine as combine_logits
    from proxytune.engine.decode_graphs import DecodeGraphs

    trio = models["qwen2"]
    dec = loaded_decoder(trio, tok, 4, PROMPTS)
    graphs = DecodeGraphs(dec)
    graphs.replay(4)
    # greedy with the pair switched off: the next token is the base's arg-max
    dec.sampler.temperature.zero_()
    dec.sampler.weights.zero_()
    dec.slot.zero_()
    graphs.replay(4)
    base = graphs.logits(4)[0]
    assert torch.equal(dec.ring[0, :4], base.argmax(-1))
    # weight 2: the arg-max of the combination
    dec.sampler.weights.fill_(2.0)
    dec.slot.zero_()
    graphs.replay(4)
    b, e, a = graphs.logits(4)
    assert torch.equal(dec.ring[0, :4], combine_logits(b, [e], [a], weights=2.0).argmax(-1))
    # sampling: another seed gives other tokens somewhere over a few steps
    dec.sampler.temperature.fill_(1.5)
    saved = dec.snapshot()
    dec.slot.zero_()
    for _ in range(4):
        graphs.replay(4)
    first = dec.ring[:4, :4].clone()
    dec.restore(saved)
    dec.sampler.seed.add_(1)
    dec.slot.zero_()
    for _ in range(4):
        graphs.replay(4)
    assert not torch.equal(first, dec.ring[:4, :4])


@pytest.mark.parametrize("kind", KINDS)
def test_graph_engine_equals_eager_engine(kind, models, tok):
    base, expert, anti = models[kind]
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager")
    default = ProxyTuner(base, expert, anti, tokenizer=tok)
    # decode="auto" stays eager until a GPU run has verified the graph path (ProxyTuner._resolve_decode, README)
    assert default.decode == "eager" and "not yet verified" in default.decode_reason
    graph = ProxyTuner(base, expert, anti, tokenizer=tok, decode="graph")
    assert graph.decode == "graph"
    prompts = PROMPTS + [PROMPTS[0].upper()]  # bucket 8
    for kw in (dict(temperature=0, max_new_tokens=N_NEW), dict(temperature=0.9, top_p=0.95, max_new_tokens=N_NEW, seed=9)):
        want = eager.generate(prompts, return_logprobs=True, **kw)
        got = graph.generate(prompts, return_logprobs=True, **kw)
        assert [g.token_ids for g in got] == [g.token_ids for g in want]
        for x, y in zip(got, want):
            torch.testing.assert_close(x.logprobs, y.logprobs, atol=1e-4, rtol=1e-4)


def test_several_buckets_and_per_row_stops(models, tok):
    base, expert, anti = models["llama"]
    eager = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager", eos_token_ids=[EOS_ID])
    graph = ProxyTuner(base, expert, anti, tokenizer=tok, decode="graph", eos_token_ids=[EOS_ID], poll_every=2)
    params = [SamplingParams(temperature=0.8, max_new_tokens=n, seed=i) for i, n in enumerate([2, 16, 4, 9, 1, 6, 12])]
    prompts = (PROMPTS * 2)[:7]
    want, got = eager.generate(prompts, params), graph.generate(prompts, params)
    assert [(g.token_ids, g.finish_reason, g.text) for g in got] == [(g.token_ids, g.finish_reason, g.text) for g in want]
    buckets = sorted({b for b, _ in graph.decoder_stats().graphs})
    assert len(buckets) >= 3 and buckets[-1] == 8, buckets
    # a second batch reuses the decoder and its graphs
    before = graph.decoder_stats()
    again = graph.generate(prompts[:3], params[:3])
    assert graph.decoder_stats().capacity == before.capacity and set(before.graphs) <= set(graph.decoder_stats().graphs)
    assert [g.token_ids for g in again] == [g.token_ids for g in eager.generate(prompts[:3], params[:3])]


def test_side_streams_always_rejoin(models):
    from proxytune.engine.decode_graphs import fork_join

    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    x = torch.randn(256, 256, device="cuda")

    def boom():
        torch.mm(x, x)
        raise RuntimeError("side failure")

    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):  # an unjoined side stream would make the capture end with an error
        with pytest.raises(RuntimeError, match="side failure"):
            fork_join(lambda: x + 1, [lambda: x * 2, boom], streams)
        main, sides = fork_join(lambda: x + 1, [lambda: x * 2, lambda: x - 1], streams)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(main, x + 1) and torch.equal(sides[0], x * 2) and torch.equal(sides[1], x - 1)
    with pytest.raises(ValueError, match="side streams"):
        fork_join(lambda: x, [lambda: x] * 3, streams)

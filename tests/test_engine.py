"""The engine against Hugging Face's own greedy decoding, itself without a cache, and other batches.

Tiny random-weight Llama / Qwen2 / GPT-2 models built from configs (``tests/tiny_models.py``): no downloads.
"""

import pytest
import torch

from proxytune import ModelSpec, ProxyTuner, SamplingParams
from proxytune.engine import Generation
from proxytune.testing import ForwardInputs
from tiny_models import EOS_ID, KINDS, PROMPTS, tiny_tokenizer

N_NEW = 8


def hf_greedy(model, tok, prompts, n):
    """``model.generate(do_sample=False)`` on a left-padded batch; new ids per row, cut after EOS."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=0)[:, enc.input_ids.shape[1] :]
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return rows


def ids(gens):
    return [g.token_ids for g in gens]


@pytest.mark.parametrize("kind", KINDS)
def test_zero_weight_and_identical_pair_give_the_base_greedy_output(kind, trios, tok):
    base, expert, anti = trios[kind]
    expected = hf_greedy(base, tok, PROMPTS, N_NEW)
    for tuner in (
        ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.0),
        ProxyTuner(base, expert, expert, tokenizer=tok, weights=1.5),  # expert - anti == 0 exactly
        ProxyTuner(base, tokenizer=tok),  # no pairs at all
    ):
        got = tuner.generate(PROMPTS, temperature=0, max_new_tokens=N_NEW)
        assert ids(got) == expected, tuner
    alone = ProxyTuner(base, tokenizer=tok).generate(PROMPTS[1], temperature=0, max_new_tokens=N_NEW)
    assert alone.token_ids == hf_greedy(base, tok, [PROMPTS[1]], N_NEW)[0]


def test_proxy_tuning_changes_the_output(trios, tok):
    base, expert, anti = trios["llama"]
    plain = ProxyTuner(base, tokenizer=tok).generate(PROMPTS, temperature=0, max_new_tokens=N_NEW)
    tuned = ProxyTuner(base, expert, anti, tokenizer=tok, weights=2.0).generate(PROMPTS, temperature=0, max_new_tokens=N_NEW)
    assert ids(plain) != ids(tuned)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_equals_decoding_without_a_cache(kind, temperature, trios, tok):
    base, expert, anti = trios[kind]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.0)
    kw = dict(temperature=temperature, top_p=0.9, max_new_tokens=N_NEW, seed=7, return_logprobs=True)
    cached = tuner.generate(PROMPTS, **kw)
    uncached = tuner.generate(PROMPTS, use_cache=False, **kw)
    assert ids(cached) == ids(uncached)
    for a, b in zip(cached, uncached):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_prompt_does_not_depend_on_its_batch(temperature, trios, tok):
    base, expert, anti = trios["qwen2"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.0)
    params = [SamplingParams(temperature=temperature, top_k=50, max_new_tokens=N_NEW, seed=100 + i) for i in range(4)]
    batched = tuner.generate(PROMPTS, params)
    alone = [tuner.generate(p, q) for p, q in zip(PROMPTS, params)]
    assert ids(batched) == ids(alone)
    assert ids(tuner.generate(PROMPTS, params, batch_size=3)) == ids(alone)  # batches of 3 and 1
    # another batch: other neighbours (a much longer one), another order
    others = [PROMPTS[2] + " " + PROMPTS[3] * 3, PROMPTS[0]]
    mixed = tuner.generate([others[0], PROMPTS[3], others[1], PROMPTS[1]], [params[0], params[3], params[1], params[1]])
    assert mixed[1].token_ids == alone[3].token_ids and mixed[3].token_ids == alone[1].token_ids


def test_seeded_sampling_is_reproducible_and_seed_dependent(trios, tok):
    base, expert, anti = trios["llama"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    a = tuner.generate(PROMPTS, temperature=1.0, max_new_tokens=N_NEW, seed=1)
    b = tuner.generate(PROMPTS, temperature=1.0, max_new_tokens=N_NEW, seed=1)
    c = tuner.generate(PROMPTS, temperature=1.0, max_new_tokens=N_NEW, seed=2)
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert all(g.seed == 1 for g in a)
    fresh = tuner.generate(PROMPTS[:2], temperature=1.0, max_new_tokens=2)  # seed None: drawn per request
    assert fresh[0].seed != fresh[1].seed


def test_rows_stop_on_their_own_limits_and_leave_the_batch(trios, tok):
    base, expert, anti = trios["llama"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.5, eos_token_ids=[EOS_ID])
    reference = tuner.generate(PROMPTS, temperature=0, max_new_tokens=12)
    # a stop string completed by the 5th token of row 3; an EOS at the 7th token of row 2
    text3 = tok.decode(reference[3].token_ids[:5], skip_special_tokens=True)
    stop = text3[-2:]
    assert stop not in tok.decode(reference[3].token_ids[:4], skip_special_tokens=True), "pick another stop"
    eos_row2 = reference[2].token_ids[6]
    params = [
        SamplingParams(temperature=0, max_new_tokens=3),
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=0, max_new_tokens=12),
        SamplingParams(temperature=0, max_new_tokens=12, stop=["never appears", stop]),
    ]
    tuner.eos_token_ids = frozenset({EOS_ID, eos_row2})
    first_eos = next(k for k, t in enumerate(reference[2].token_ids) if t == eos_row2)
    sizes = ForwardInputs(base)
    try:
        got = tuner.generate(PROMPTS, params)
    finally:
        sizes.remove()
    assert got[0].token_ids == reference[0].token_ids[:3] and got[0].finish_reason == "length"
    assert got[2].token_ids == reference[2].token_ids[: first_eos + 1] and got[2].finish_reason == "eos"
    assert got[3].finish_reason == "stop"
    assert got[3].token_ids == reference[3].token_ids[: len(got[3].token_ids)] and len(got[3].token_ids) <= 5
    assert got[3].text == text3[: text3.index(stop)] and stop not in got[3].text
    assert got[1].finish_reason in ("length", "eos")
    # every row's forward calls: 4 rows until row 0 ends after 3 tokens, then fewer; one call per token after
    # the prefill, and none for a row after it finished
    expected, alive = [], [len(g.token_ids) for g in got]
    for step in range(max(alive)):
        expected.append(sum(1 for n in alive if n > step))
    assert sizes.sizes == expected  # the prefill with 4 rows, then the live rows of each step


def test_zero_new_tokens_and_streaming(trios, tok):
    base, expert, anti = trios["gpt2"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    params = [SamplingParams(max_new_tokens=0), SamplingParams(temperature=0.7, max_new_tokens=6, seed=3, stop=["e"])]
    gens = tuner.generate(PROMPTS[:2], params, return_logprobs=True)
    assert gens[0] == Generation(PROMPTS[0], "", [], "length", gens[0].seed, [])
    events = list(tuner.stream(PROMPTS[:2], params, return_logprobs=True))
    assert [e.token_id for e in events if e.index == 0] == [None]
    row = [e for e in events if e.index == 1]
    assert [e.token_id for e in row] == gens[1].token_ids
    assert "".join(e.text for e in row) == gens[1].text
    assert [e.logprob for e in row] == gens[1].logprobs
    assert row[-1].finish_reason == gens[1].finish_reason and all(e.finish_reason is None for e in row[:-1])


def test_per_request_weights(trios, tok):
    base, expert, anti = trios["llama"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.0)
    zero = tuner.generate(PROMPTS, temperature=0, max_new_tokens=N_NEW, weights=0.0)
    assert ids(zero) == ids(ProxyTuner(base, tokenizer=tok).generate(PROMPTS, temperature=0, max_new_tokens=N_NEW))
    mixed = tuner.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_new_tokens=N_NEW, weights=[0.0]),
                                          SamplingParams(temperature=0, max_new_tokens=N_NEW)])  # fmt: skip
    one = tuner.generate(PROMPTS[1], temperature=0, max_new_tokens=N_NEW)
    assert mixed[0].token_ids == zero[0].token_ids and mixed[1].token_ids == one.token_ids


def test_two_pairs_and_mixed_architectures(trios, tok):
    base = trios["gpt2"][0]
    (e1, a1), (e2, a2) = trios["llama"][1:], trios["qwen2"][1:]
    two = ProxyTuner(base, [e1, e2], [a1, a2], tokenizer=tok, weights=[1.0, 0.0])
    one = ProxyTuner(base, e1, a1, tokenizer=tok, weights=1.0)
    kw = dict(temperature=0.9, max_new_tokens=N_NEW, seed=5)
    assert ids(two.generate(PROMPTS, **kw)) == ids(one.generate(PROMPTS, **kw))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(temperature=-1.0), "temperature must be"),
        (dict(top_k=-2), "top_k must be"),
        (dict(min_p=1.0), "min_p must be"),
        (dict(max_new_tokens=-1), "max_new_tokens must be"),
        (dict(weights=[1.0, 2.0]), "weights must be"),
        (dict(stop=[""]), "stop must be"),
    ],
)
def test_bad_parameters_are_clear_errors(bad, message, trios, tok):
    base, expert, anti = trios["llama"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    with pytest.raises(ValueError, match="request 0: " + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        tuner.generate(["hi"], **bad)


def test_unknown_sampling_parameter(trios, tok):
    tuner = ProxyTuner(trios["llama"][0], tokenizer=tok)
    with pytest.raises(TypeError, match="unknown sampling parameter.*top_q"):
        tuner.generate(["hi"], top_q=0.5)


def test_bad_construction_is_a_clear_error(trios, tok, tmp_path):
    base, expert, anti = trios["llama"]
    with pytest.raises(ValueError, match="1 experts but 0 anti-experts"):
        ProxyTuner(base, expert, [], tokenizer=tok)
    with pytest.raises(ValueError, match="weights must be"):
        ProxyTuner(base, expert, anti, tokenizer=tok, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="no such directory"):
        ProxyTuner(str(tmp_path / "missing"), tokenizer=tok)
    with pytest.raises(ValueError, match="no tokenizer"):
        ProxyTuner(base)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ProxyTuner(ModelSpec(base, device="cuda"), tokenizer=tok)
    with pytest.raises(ValueError, match="has no chat template"):
        ProxyTuner(base, ModelSpec(expert, template="chat", tokenizer=tiny_tokenizer(chat_template=False)), anti,
                   tokenizer=tiny_tokenizer(chat_template=False))  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_long_greedy_generation_matches_hugging_face(kind, trios, tok):
    base, expert, anti = trios[kind]
    prompts = PROMPTS + [p.upper() for p in PROMPTS]
    expected = hf_greedy(base, tok, prompts, 48)
    got = ProxyTuner(base, expert, expert, tokenizer=tok, weights=2.0).generate(prompts, temperature=0, max_new_tokens=48)
    assert ids(got) == expected


def test_batch_flags_come_from_the_requests_on_the_host(trios, tok, monkeypatch):
    """The engine tells the op which filters any sampled row turns on (``filters_used``) and whether it reads
    log-probabilities, decided from the requests when the batch forms; the tokens are those of the op
    inferring everything itself (``filters_used=None``)."""
    import proxytune.engine.sampler_state as sampler_state

    base, expert, anti = trios["llama"]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, decode="eager")
    params = [SamplingParams(temperature=0, top_p=0.5, max_new_tokens=5),  # greedy: no filter changes it
              SamplingParams(temperature=0.9, top_k=7, max_new_tokens=5, seed=3),
              SamplingParams(temperature=1.1, max_new_tokens=5, seed=4)]  # fmt: skip
    seen, real = [], sampler_state.proxy_sample

    def recording(*args, **kwargs):
        seen.append((kwargs["filters_used"], kwargs["return_logprobs"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler_state, "proxy_sample", recording)
    flagged = tuner.generate(PROMPTS[:3], params)
    assert seen and all(flags == (frozenset({"top_k"}), False) for flags in seen), seen
    seen.clear()
    tuner.generate(PROMPTS[:3], params, return_logprobs=True)
    assert all(flags == (frozenset({"top_k"}), True) for flags in seen), seen

    def inferring(*args, **kwargs):
        return real(*args, **{**kwargs, "filters_used": None})

    monkeypatch.setattr(sampler_state, "proxy_sample", inferring)
    assert ids(tuner.generate(PROMPTS[:3], params)) == ids(flagged)
    greedy = [SamplingParams(temperature=0, top_k=3, top_p=0.2, min_p=0.5)] * 2
    state = sampler_state.SamplerState.for_requests(greedy, [0, 1], [1.0], torch.device("cpu"))
    assert state.filters_used == frozenset() and not state.any_sampled  # host-known: no device read

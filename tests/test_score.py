"""``ProxyTuner.score`` against a naive token-by-token float64 loop, the base's own ``model(...)`` and ``generate``.

Tiny random-weight Llama / Qwen2 / GPT-2 models (``tests/tiny_models.py``); padded vocabularies, two pairs and
prompts of different lengths share one batch.
"""

import math

import pytest
import torch

from proxytune import ModelSpec, ProxyTuner
from proxytune.engine.score import split_continuation
from oracle import logprobs64
from tiny_models import KINDS, PROMPTS, tiny_model

CONTINUATIONS = [" this is a tiny", " the lazy dog", " quick", " small ones"]
TOL = 2e-4  # fp32 combine + log-softmax over 320 ids vs float64, on logits of size ~10


def bare(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def naive_score(models, contexts, cont, weights, vocab):
    """Token by token, one model call per prefix, float64: the log-probability of each continuation token
    under log_softmax(base + sum_i w_i (expert_i - anti_i)) over the first ``vocab`` ids (``tests/oracle.py``)."""
    return [float(logprobs64(models, [ctx + cont[:t] for ctx in contexts], weights, vocab)[cont[t]]) for t in range(len(cont))]


def lm_eval_ids(tok, prompt, cont):
    """lm-eval's TemplateLM._encode_pair for a causal model, written out again."""
    n = len(prompt) - len(prompt.rstrip())
    if n:
        cont, prompt = prompt[-n:] + cont, prompt[:-n]
    whole, ctx = bare(tok, prompt + cont), bare(tok, prompt)
    return prompt, whole[len(ctx) :]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family():
    """Per kind: base (vocabulary padded to 336), two experts and two anti-experts (320 and 328 wide)."""
    return {
        kind: [tiny_model(kind, vocab_size=v, seed=s) for s, v in ((0, 336), (1, 320), (2, 328), (3, 328), (4, 320))]
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [[0.0, 0.0], [1.0, 1.0], [0.5, -0.25]])
def test_score_equals_a_naive_float64_loop(kind, weights, family, tok):
    base, e0, e1, a0, a1 = family[kind]
    tuner = ProxyTuner(base, [e0, e1], [a0, a1], tokenizer=tok, weights=weights)
    assert tuner.vocab_size == 320  # the tokenizer's 320 ids; the base's 16 padding columns are ignored
    got = tuner.score(PROMPTS, CONTINUATIONS, batch_size=3)  # two batches, mixed lengths in each
    for prompt, cont, s in zip(PROMPTS, CONTINUATIONS, got):
        context, ids = lm_eval_ids(tok, prompt, cont)
        assert s.token_ids == ids
        ctx = tok(context)["input_ids"]  # BOS + prompt, as generate feeds it
        want = naive_score([base, e0, e1, a0, a1], [ctx] * 5, ids, weights, 320)
        assert s.token_logprobs == pytest.approx(want, abs=TOL)
        assert s.logprob == pytest.approx(math.fsum(s.token_logprobs), abs=1e-9)
        assert len(s.token_logprobs) == len(ids)
    again = tuner.score(PROMPTS, CONTINUATIONS)  # one batch: the same numbers
    for a, b in zip(got, again):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_weight_zero_is_the_base_log_likelihood_as_model_gives_it(kind, tok):
    base, expert, anti = (tiny_model(kind, seed=s) for s in (0, 1, 2))  # 320 wide: the base's whole softmax
    got = ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.0).score(PROMPTS, CONTINUATIONS)
    for prompt, cont, s in zip(PROMPTS, CONTINUATIONS, got):
        ctx = tok(prompt)["input_ids"]
        full = ctx + s.token_ids
        with torch.no_grad():
            logp = base(input_ids=torch.tensor([full])).logits[0].double().log_softmax(-1)
        want = [float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(s.token_ids)]
        assert s.token_logprobs == pytest.approx(want, abs=TOL)


def test_templates_and_token_id_inputs(family, tok):
    base, e0, _, a0, _ = family["llama"]
    tpl = "Q: {prompt}\nA:"
    tuner = ProxyTuner(base, ModelSpec(e0, template=tpl), a0, tokenizer=tok, weights=0.7)
    prompts = ["hello world", [5, 17, 40, 9]]
    conts = [" this", [30, 31, 32]]
    got = tuner.score(prompts, conts)
    pre, post = bare(tok, "Q: "), bare(tok, "\nA:")
    ids0 = lm_eval_ids(tok, "hello world", " this")[1]
    cases = [(bare(tok, "hello world"), tok("hello world")["input_ids"], ids0), ([5, 17, 40, 9], [5, 17, 40, 9], [30, 31, 32])]
    for s, (b, raw, ids) in zip(got, cases):
        assert s.token_ids == ids
        want = naive_score([base, e0, a0], [raw, pre + b + post, raw], ids, [0.7], 320)
        assert s.token_logprobs == pytest.approx(want, abs=TOL)


def test_a_conversation_prompt_with_a_chat_expert(family, tok):
    """The chat expert sees the conversation in its chat template, the others its contents one per line; the
    continuation is encoded on its own and follows each."""
    base, e0, _, a0, _ = family["gpt2"]
    tuner = ProxyTuner(base, ModelSpec(e0, template="chat"), a0, tokenizer=tok, weights=1.0)
    chat = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "a tiny model"},
            {"role": "user", "content": "the lazy dog"}]  # fmt: skip
    (s,) = tuner.score([chat], [" jumps over"])
    ids = bare(tok, " jumps over")
    assert s.token_ids == ids
    templated = bare(tok, tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    plain = tok("\n".join(m["content"] for m in chat))["input_ids"]
    want = naive_score([base, e0, a0], [plain, templated, plain], ids, [1.0], 320)
    assert s.token_logprobs == pytest.approx(want, abs=TOL)


def test_sampled_tokens_score_as_generate_reports_them(family, tok):
    """At temperature 1 without filters generate's logprobs are the same distribution's: score must agree,
    and the greedy continuation is greedy."""
    base, e0, e1, a0, a1 = family["qwen2"]
    tuner = ProxyTuner(base, [e0, e1], [a0, a1], tokenizer=tok, weights=[1.0, 0.5])
    gens = tuner.generate(PROMPTS, temperature=1.0, seed=3, max_new_tokens=6, return_logprobs=True)
    got = tuner.score(PROMPTS, [g.token_ids for g in gens])
    for g, s in zip(gens, got):
        assert s.token_logprobs == pytest.approx(g.logprobs, abs=TOL)
    greedy = tuner.generate(PROMPTS, temperature=0, max_new_tokens=6)
    assert all(s.is_greedy for s in tuner.score(PROMPTS, [g.token_ids for g in greedy]))
    assert not all(s.is_greedy for s in got)  # sampled tokens are not all argmax


def test_boundary_rule_is_lm_evals(tok):
    """Trailing whitespace moves to the continuation; a token merging across the boundary is left as lm-eval
    leaves it; a continuation merged away entirely is an error."""
    assert split_continuation(tok, "hello world ", "this") == ("hello world", bare(tok, " this"))
    # a boundary that merges in this tokenizer: "h" is [76] alone, but "hello" is [292, 301]
    prompt, cont = "h", "ello world"
    whole, ctx = bare(tok, prompt + cont), bare(tok, prompt)
    assert whole[: len(ctx)] != ctx  # the merge this case is about
    assert split_continuation(tok, prompt, cont) == (prompt, whole[len(ctx) :])
    base = tiny_model("llama", seed=0)
    tuner = ProxyTuner(base, tokenizer=tok)
    assert tuner.score([prompt], [cont])[0].token_ids == whole[len(ctx) :]
    assert len(bare(tok, "hello")) <= len(bare(tok, "he"))  # "he" + "llo": [76, 73] vs [292, 301]
    with pytest.raises(ValueError, match="continuation 0 .* no token ids of its own"):
        tuner.score(["he"], ["llo"])


def test_bad_requests_name_the_argument(tok):
    base, expert, anti = (tiny_model("gpt2", seed=s) for s in (0, 1, 2))
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok)
    with pytest.raises(ValueError, match="continuation 1 is empty"):
        tuner.score(["a", "b"], [" x", ""])
    with pytest.raises(ValueError, match="continuation 0 is empty"):
        tuner.score(["a"], [[]])
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        tuner.score(["a", "b"], [" x"])
    with pytest.raises(ValueError, match="takes at most 512"):
        tuner.score(["a"], [[7] * 512])  # BOS + "a" + 511 fed tokens = 513 positions
    assert len(tuner.score(["a"], [[7] * 511])[0].token_ids) == 511  # 2 + 510 = 512 positions: fits
    with pytest.raises(ValueError, match="outside the common vocabulary"):
        tuner.score(["a"], [[5, 320]])
    with pytest.raises(ValueError, match="weights must be"):
        tuner.score(["a"], [" x"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="batch_size"):
        tuner.score(["a"], [" x"], batch_size=0)
    with pytest.raises(TypeError, match="continuation 0"):
        tuner.score(["a"], [3.5])
    one = tuner.score("hello world", " this")  # one pair in, one Score out
    assert one.token_ids == split_continuation(tok, "hello world", " this")[1]


def test_unclear_inputs_get_clear_answers(tok):
    """Issue 23: a whitespace-only continuation that encodes to nothing, a lone surrogate in a text prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world"])}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # whitespace has no ids of its own, as in word-level vocabularies
    wtok = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with pytest.raises(ValueError, match=r"continuation 0 \('  '\) is whitespace only and gives no token ids"):
        ProxyTuner(tiny_model("llama", seed=0), tokenizer=wtok).score(["hello world"], ["  "])
    tuner = ProxyTuner(tiny_model("llama", seed=0), tokenizer=tok)
    with pytest.raises(ValueError, match="prompt 1 is not valid Unicode text: '\\\\udcff' at character 2"):
        tuner.score(["fine", "ab\udcffc"], [" x", " y"])

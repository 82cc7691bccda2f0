"""``ProxyTuningLogitsProcessor`` inside ``base.generate``: greedy against ``ProxyTuner`` and a naive loop, beam
search against a naive beam search, sampling, left padding, cache reuse. Tiny random-weight models."""

import math

import pytest
import torch
from transformers import LogitsProcessorList

from proxytune import ProxyTuner
from proxytune.integrations.hf import ProxyTuningLogitsProcessor
from oracle import combined64
from tiny_models import EOS_ID, PAD_ID, PROMPTS, tiny_model

N_NEW = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def left_padded(tok, prompts):
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


def cut(rows):
    return [r[: r.index(EOS_ID) + 1] if EOS_ID in r else r for r in rows]


def naive_greedy(models, prompt_ids, weights, n_new, vocab):
    ids, new = list(prompt_ids), []
    for _ in range(n_new):
        t = int(combined64(models, ids, weights, vocab).argmax())
        new.append(t)
        ids.append(t)
        if t == EOS_ID:
            break
    return new


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("how", ["attention_mask", "pad_token_id"])
def test_greedy_generate_equals_proxytuner_and_a_naive_loop(kind, how, trios, tok):
    base, expert, anti = trios[kind]
    enc = left_padded(tok, PROMPTS)  # four prompts of different lengths: left padding
    kw = {"attention_mask": enc.attention_mask} if how == "attention_mask" else {"pad_token_id": PAD_ID}
    p = ProxyTuningLogitsProcessor(expert, anti, weights=1.5, **kw)
    out = base.generate(**enc, do_sample=False, max_new_tokens=N_NEW, logits_processor=LogitsProcessorList([p]))
    got = cut(out[:, enc.input_ids.shape[1] :].tolist())
    want = [g.token_ids for g in ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.5).generate(
        PROMPTS, temperature=0, max_new_tokens=N_NEW)]  # fmt: skip
    assert got == want
    naive = [naive_greedy([base, expert, anti], tok(q)["input_ids"], [1.5], N_NEW, 320) for q in PROMPTS]
    assert got == naive
    assert p.prefills == 1  # one prefill, then one step per token on the small models' caches
    plain = cut(base.generate(**enc, do_sample=False, max_new_tokens=N_NEW)[:, enc.input_ids.shape[1] :].tolist())
    assert got != plain  # the steer changes the output


def test_two_pairs_padded_vocabularies_and_reuse(tok):
    base = tiny_model("llama", vocab_size=336, seed=0)
    e0, e1, a0, a1 = (tiny_model("llama", vocab_size=v, seed=s) for s, v in ((1, 320), (2, 328), (3, 328), (4, 320)))
    enc = left_padded(tok, PROMPTS[:3])
    p = ProxyTuningLogitsProcessor([e0, e1], [a0, a1], weights=[1.0, -0.5], attention_mask=enc.attention_mask)
    out = base.generate(**enc, do_sample=False, max_new_tokens=6, logits_processor=LogitsProcessorList([p]))
    got = cut(out[:, enc.input_ids.shape[1] :].tolist())
    assert all(t < 320 for row in got for t in row)  # never a column past the common vocabulary
    naive = [naive_greedy([base, e0, e1, a0, a1], tok(q)["input_ids"], [1.0, -0.5], 6, 320) for q in PROMPTS[:3]]
    assert got == naive
    enc2 = left_padded(tok, PROMPTS[3:] + PROMPTS[:1])  # another batch: reset with its mask, same processor
    p.reset(attention_mask=enc2.attention_mask)
    out2 = base.generate(**enc2, do_sample=False, max_new_tokens=6, logits_processor=LogitsProcessorList([p]))
    naive2 = [naive_greedy([base, e0, e1, a0, a1], tok(q)["input_ids"], [1.0, -0.5], 6, 320) for q in PROMPTS[3:] + PROMPTS[:1]]
    assert cut(out2[:, enc2.input_ids.shape[1] :].tolist()) == naive2
    with pytest.raises(ValueError, match="call reset"):  # a stale mask of another shape is refused, not misused
        base.generate(**left_padded(tok, PROMPTS), do_sample=False, max_new_tokens=2,
                      logits_processor=LogitsProcessorList([p]))  # fmt: skip


def test_sampling_with_a_seed_runs_and_repeats(trios, tok):
    base, expert, anti = trios["llama"]
    enc = left_padded(tok, PROMPTS)
    runs = []
    for _ in range(2):
        p = ProxyTuningLogitsProcessor(expert, anti, attention_mask=enc.attention_mask)
        torch.manual_seed(7)
        out = base.generate(**enc, do_sample=True, temperature=0.8, top_p=0.9, repetition_penalty=1.1,
                            max_new_tokens=N_NEW, logits_processor=LogitsProcessorList([p]))  # fmt: skip
        runs.append(out.tolist())
    assert runs[0] == runs[1]
    assert all(0 <= t < 320 for row in runs[0] for t in row)


def naive_beam_search(models, prompt, weights, beams, n_new, vocab, banned):
    """Textbook beam search over float64 proxy-tuned log-probabilities (no EOS: ``banned`` ids are -inf):
    keep the ``beams`` best continuations by summed log-probability, all of length ``n_new``."""
    hyps = [([], 0.0)]
    for _ in range(n_new):
        cands = []
        for seq, score in hyps:
            s = combined64(models, prompt + seq, weights, vocab)
            s[banned] = -math.inf
            lp = s.log_softmax(-1)
            cands += [(seq + [t], score + float(lp[t])) for t in range(vocab)]
        hyps = sorted(cands, key=lambda c: -c[1])[:beams]
    return hyps


def test_beam_search_equals_a_naive_beam_search_on_a_tiny_vocabulary():
    v = 48
    base, expert, anti = (tiny_model("llama", vocab_size=v, seed=s) for s in (0, 1, 2))
    prompts = [[1, 17, 5, 33, 9], [1, 40, 22]]  # ids; the second is left-padded
    length = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (length - len(q)) + q for q in prompts])
    mask = torch.tensor([[0] * (length - len(q)) + [1] * len(q) for q in prompts])
    p = ProxyTuningLogitsProcessor(expert, anti, weights=0.8, attention_mask=mask)
    out = base.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=3, num_return_sequences=3,
                        max_new_tokens=4, suppress_tokens=[EOS_ID], length_penalty=1.0, early_stopping=False,
                        logits_processor=LogitsProcessorList([p]), output_scores=False,
                        return_dict_in_generate=True)  # fmt: skip
    got = out.sequences[:, length:].tolist()
    for i, q in enumerate(prompts):
        want = naive_beam_search([base, expert, anti], q, [0.8], 3, 4, v, [EOS_ID])
        assert got[3 * i : 3 * i + 3] == [seq for seq, _ in want]
    assert p.prefills == 1  # beams reordered and duplicated by reindexing the caches, never recomputed


def test_bad_arguments():
    m = tiny_model("gpt2", seed=0)
    with pytest.raises(ValueError, match="1 experts but 2 anti-experts"):
        ProxyTuningLogitsProcessor([m], [m, m])
    with pytest.raises(ValueError, match="weights must be"):
        ProxyTuningLogitsProcessor([m, m], [m, m], weights=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="expert 0 must be a transformers PreTrainedModel"):
        ProxyTuningLogitsProcessor("gpt2", m)
    with pytest.raises(ValueError, match="attention_mask must be"):
        ProxyTuningLogitsProcessor(m, m, attention_mask=torch.ones(3))


# --- issue 23: padding the processor cannot see, weights past the bound, meta models, position room ---------


def test_a_padded_batch_without_mask_or_pad_id_is_refused(trios, tok):
    base, expert, anti = trios["llama"]
    enc = left_padded(tok, PROMPTS)  # rows of different lengths: left padding with PAD_ID
    for kw in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
        p = ProxyTuningLogitsProcessor(expert, anti)
        with pytest.raises(ValueError, match="starts with token 0, a pad id of the small models.*attention_mask="):
            base.generate(**enc, max_new_tokens=2, logits_processor=LogitsProcessorList([p]), **kw)
    same = left_padded(tok, [PROMPTS[0], PROMPTS[0]])  # no padding: nothing to see, it runs
    p = ProxyTuningLogitsProcessor(expert, anti)
    out = base.generate(**same, do_sample=False, max_new_tokens=2, logits_processor=LogitsProcessorList([p]))
    assert out.shape == (2, same.input_ids.shape[1] + 2)


def test_weights_past_the_bound_are_refused(trios):
    _, expert, anti = trios["gpt2"]
    for w in (3e38, -1.5e6, math.inf, True):
        with pytest.raises((ValueError, TypeError), match=r"weights must be a finite number with \|w\| <= 1e6"):
            ProxyTuningLogitsProcessor(expert, anti, weights=w)


def test_meta_models_are_refused():
    with torch.device("meta"):
        m = tiny_model("llama", seed=0)
    real = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="expert 0 is on the meta device"):
        ProxyTuningLogitsProcessor(m, real)
    with pytest.raises(ValueError, match="anti-expert 0 is on the meta device"):
        ProxyTuningLogitsProcessor(real, m)


def test_an_expert_with_fewer_positions_fails_clearly(tok):
    base = tiny_model("gpt2", seed=0)
    expert, anti = (tiny_model("gpt2", seed=s) for s in (1, 2))
    for m in (expert, anti):  # GPT-2 with 8 positions: the first 8 rows of its position table
        m.transformer.wpe.weight.data = m.transformer.wpe.weight.data[:8].clone()
        m.transformer.wpe.num_embeddings = m.config.n_positions = 8
    ids = torch.tensor([[1, 17, 5, 33, 9, 40]])  # 6 positions: the prompt fits, the fourth new token does not
    p = ProxyTuningLogitsProcessor(expert, anti)
    with pytest.raises(ValueError, match="input_ids has 9 positions but expert 0 takes at most 8"):
        base.generate(input_ids=ids, suppress_tokens=[EOS_ID], do_sample=False, max_new_tokens=4,
                      logits_processor=LogitsProcessorList([p]))  # fmt: skip
    long = tok(["the quick brown fox jumps over the lazy dog"], return_tensors="pt")  # refused at the prefill
    with pytest.raises(ValueError, match="positions but expert 0 takes at most 8"):
        base.generate(**long, do_sample=False, max_new_tokens=1,
                      logits_processor=LogitsProcessorList([ProxyTuningLogitsProcessor(expert, anti)]))  # fmt: skip

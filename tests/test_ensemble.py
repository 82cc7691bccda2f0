"""The ensemble: one object for the models in their roles, and the rules that live in it once (model order,
pairs, weights, position room), as every entry point meets them."""

import pytest
import torch

from proxytune import Ensemble, ProxyTuner, SamplingParams
from proxytune.engine.ensemble import check_pairs, common_position_limit, in_order, role_names, split_roles
from proxytune.engine.members import LocalModel, Member
from tiny_models import PROMPTS


def test_the_model_order_is_defined_once():
    items = in_order("b", ["e0", "e1"], ["a0", "a1"])
    assert items == ["b", "e0", "e1", "a0", "a1"]
    assert split_roles(items) == ("b", ["e0", "e1"], ["a0", "a1"]) == split_roles(items, 2)
    assert role_names(2) == ["base", "expert 0", "expert 1", "anti-expert 0", "anti-expert 1"]
    assert split_roles(["b"]) == ("b", [], [])
    with pytest.raises(ValueError, match="4 per-model items for a base and 1 pair"):
        split_roles(items[:4], 1)
    with pytest.raises(ValueError, match="they come in pairs"):
        check_pairs(["e"], [])
    with pytest.raises(ValueError, match="at least one"):
        check_pairs(None, None, at_least_one=True)
    assert common_position_limit([None, 64, 32]) == 32 and common_position_limit([None]) is None


def test_a_tuner_over_an_ensemble_is_the_tuner_over_its_models(trios, tok):
    base, expert, anti = trios["llama"]
    ensemble = Ensemble.of_modules(base, expert, anti, weights=0.5, tokenizer=tok)
    assert [m.name for m in ensemble.members] == ["base", "expert 0", "anti-expert 0"]
    assert all(isinstance(m, LocalModel) and isinstance(m, Member) for m in ensemble.members)
    assert ensemble.weights == [0.5] and ensemble.pair_weights(2.0) == [2.0] and ensemble.n_pairs == 1
    assert ensemble.split(["s", "e", "a"]) == ("s", ["e"], ["a"])
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=6, seed=5)
    direct = ProxyTuner(base, expert, anti, weights=0.5, tokenizer=tok).generate(PROMPTS, params)
    over = ProxyTuner(ensemble)
    assert over.ensemble is ensemble and over.models == ensemble.members
    assert [g.token_ids for g in over.generate(PROMPTS, params)] == [g.token_ids for g in direct]
    with pytest.raises(ValueError, match="an Ensemble holds the models already; weights"):
        ProxyTuner(ensemble, weights=1.0)


def test_the_weight_and_pair_rules_give_one_answer(trios, tok):
    base, expert, anti = trios["llama"]
    for bad, error in ((float("nan"), ValueError), (True, TypeError), (2e6, ValueError)):
        with pytest.raises(error, match="weights must be a finite number with"):
            Ensemble.of_modules(base, expert, anti, weights=bad, tokenizer=tok)
        with pytest.raises(error, match="weights must be a finite number with"):
            ProxyTuner(base, expert, anti, weights=bad, tokenizer=tok)
    with pytest.raises(ValueError, match="there is no \\(expert, anti-expert\\) pair to weigh"):
        Ensemble.of_modules(base, weights=1.0, tokenizer=tok)
    with pytest.raises(ValueError, match="got 1 experts but 0 anti-experts; they come in pairs"):
        Ensemble.of_modules(base, expert, (), tokenizer=tok)
    with pytest.raises(ValueError, match="got 1 experts but 0 anti-experts; they come in pairs"):
        ProxyTuner(base, expert, (), tokenizer=tok)


def test_the_position_room_is_one_rule(trios, tok):
    base, expert, anti = trios["llama"]
    ensemble = Ensemble.of_modules(base, expert, anti, tokenizer=tok)
    limit = ensemble.position_limits[0]
    assert limit is not None and ensemble.position_limits == [limit] * 3
    room, member, at = ensemble.room([3, 5, 4])
    assert (room, member, at) == (limit - 5, ensemble.members[1], limit)
    assert ensemble.room(ensemble.template_lengths())[0] == limit  # no templates: lm-eval's max_length
    _, per_member = ensemble.prompt_ids(0, PROMPTS[0])
    assert per_member[0] == per_member[1] == per_member[2] == tok(PROMPTS[0]).input_ids
    with pytest.raises(ValueError, match="prompt 3 has token id 100000, outside base's embedding"):
        ensemble.prompt_ids(3, [1, 100000])


def test_a_new_kind_of_member_is_one_class(trios, tok):
    """A member that is not a local module (a stand-in for a served base) runs through the same engine: the
    ensemble and the eager decoder read only the Member interface; the static step refuses it by name."""
    base, expert, anti = trios["llama"]
    local = LocalModel.adopt(base, "base")

    class Wrapped(Member):
        def __init__(self, inner: LocalModel):
            self.inner, self.name, self.source = inner, "base", "wrapped"
            self.device, self.width, self.tokenizer, self.template = inner.device, inner.width, None, None
            self.module = None  # not a local module: eager decoders only

        @property
        def position_limit(self):
            return self.inner.position_limit

        def runner(self, use_cache=True):
            return self.inner.runner(use_cache)

        def score_logits(self, ids, mask, keep):
            return self.inner.score_logits(ids, mask, keep)

    others = [LocalModel.adopt(expert, "expert 0")], [LocalModel.adopt(anti, "anti-expert 0")]
    plain = ProxyTuner(Ensemble(local, *others, tokenizer=tok), decode="eager")
    wrapped = ProxyTuner(Ensemble(Wrapped(local), *others, tokenizer=tok))
    assert wrapped.decode == "eager" and "base is not a local model" in wrapped.decode_reason
    params = SamplingParams(temperature=0.9, max_new_tokens=5, seed=2)
    assert [g.token_ids for g in wrapped.generate(PROMPTS, params)] == [g.token_ids for g in plain.generate(PROMPTS, params)]
    got, want = wrapped.score(PROMPTS[:2], [" a", " b"]), plain.score(PROMPTS[:2], [" a", " b"])
    assert [s.token_logprobs for s in got] == [s.token_logprobs for s in want]
    with pytest.raises(ValueError, match="decode='static' is not possible: base is not a local model"):
        ProxyTuner(Ensemble(Wrapped(local), *others, tokenizer=tok), decode="static")
    assert torch.device("cpu") == wrapped.device

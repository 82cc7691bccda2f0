"""The miniature measured like a paper (issue 26): the split, the weight choice, the bootstrap, the token roles,
and ``proxytune eval --alpha`` end to end on a small subset."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from proxytune.tinyworld.dial import ALPHA_GRID, choose_weight, parse_weights, split_of_person, split_questions
from proxytune.tinyworld.stats import bootstrap, gap_samples, interval
from proxytune.tinyworld.token_shift import shift_table, token_roles
from proxytune.tinyworld.world import make_world



@pytest.fixture
def no_models(monkeypatch):
    """Loading a model is a test failure: bad flags must fail first."""
    import proxytune.tinyworld.evaluation

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded models before rejecting its input")

    monkeypatch.setattr(proxytune.tinyworld.evaluation, "build_tuners", refuse)


def error_of(capsys, argv):
    """Run the CLI: exit status 2, nothing on stdout, one line ``proxytune: error: ...`` on stderr; the line."""
    from proxytune.cli import main

    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "" and err.startswith("proxytune: error: ") and err.count("\n") == 1, err
    return err[len("proxytune: error: ") : -1]


# --- the split ---------------------------------------------------------------------------------------------


def test_split_halves_are_disjoint_by_person_and_deterministic():
    from proxytune.tinyworld.evaluation import world_of

    w = world_of()  # the shipped family's world: 200 held-out people, 4 questions each
    questions = w.eval_questions()
    val, test = split_questions(w, questions, "validation"), split_questions(w, questions, "test")
    assert len(questions) == 800 and len(val) == len(test) == 400
    assert {q.entity for q in val}.isdisjoint({q.entity for q in test})
    assert sorted(val + test, key=questions.index) == questions and split_questions(w, questions, "all") == questions
    assert val == split_questions(world_of(), world_of().eval_questions(), "validation")
    first = w.eval_ids[0]  # the first held-out person is validation, the second test (even/odd rule)
    assert {q.entity for q in val[:4]} == {first} and {q.entity for q in test[:4]} == {first + 1}
    assert [split_of_person(k) for k in range(4)] == ["validation", "test", "validation", "test"]


def test_split_refuses_unknown_splits_and_tuning_people():
    w = make_world(0, 40, 30)
    with pytest.raises(ValueError, match="split must be one of"):
        split_questions(w, w.eval_questions(), "train")
    with pytest.raises(ValueError, match="not a held-out person"):
        split_questions(w, w.questions([0], "one"), "all")


# --- the weight choice -------------------------------------------------------------------------------------


def test_weight_choice_takes_the_most_right_answers_ties_nearer_one():
    assert choose_weight({0.5: 10, 1.0: 12, 2.0: 11}) == 1.0
    assert choose_weight({0.5: 10, 1.0: 9, 2.0: 11}) == 2.0
    assert choose_weight({0.5: 11, 1.5: 11, 3.0: 11}) == 0.5  # 0.5 and 1.5 are as near 1: the smaller
    assert choose_weight({0.0: 11, 1.25: 11, 2.5: 11}) == 1.25
    assert choose_weight({1.0: 5, 1.25: 5}) == 1.0
    assert sorted(ALPHA_GRID) == list(ALPHA_GRID) and 1.0 in ALPHA_GRID and 0.0 in ALPHA_GRID
    with pytest.raises(ValueError):
        choose_weight({})


def test_parse_weights():
    assert parse_weights("0,0.25,1") == [0.0, 0.25, 1.0] and parse_weights("-1") == [-1.0]
    for bad in ("", "1,,2", "x", "1,1", "nan", "inf", "1e39"):
        with pytest.raises(ValueError):
            parse_weights(bad)


# --- the bootstrap -----------------------------------------------------------------------------------------


def test_bootstrap_is_seeded_contains_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(5)
    widths = []
    for n in (50, 200, 800):
        x = (rng.random(n) < 0.7).astype(int)
        a, b = bootstrap({"x": x}, n_resamples=2000), bootstrap({"x": x}, n_resamples=2000)
        assert np.array_equal(a["x"], b["x"])  # seeded: the same resamples
        assert not np.array_equal(a["x"], bootstrap({"x": x}, n_resamples=2000, seed=1)["x"])
        lo, hi = interval(a["x"])
        assert lo <= x.mean() <= hi
        # the binomial standard error: the 95% interval is about 2 x 1.96 of it wide
        se = np.sqrt(x.mean() * (1 - x.mean()) / n)
        assert 0.8 * 3.92 * se < hi - lo < 1.2 * 3.92 * se
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # a constant score has a zero-width interval; a rate's interval does not depend on its neighbours
    assert interval(bootstrap({"ones": [1] * 30})["ones"]) == (1.0, 1.0)
    x = (rng.random(100) < 0.5).astype(int)
    alone = bootstrap({"x": x}, n_resamples=500)["x"]
    assert np.array_equal(alone, bootstrap({"y": 1 - x, "x": x}, n_resamples=500)["x"])


def test_gap_interval_comes_from_the_same_resamples():
    rng = np.random.default_rng(7)
    n = 400
    base = np.zeros(n, int)
    tuned = (rng.random(n) < 0.9).astype(int)
    proxy = tuned * (rng.random(n) < 0.8)  # right only where tuned is right: the gap closed is at most 1
    s = bootstrap({"base": base, "tuned": tuned, "proxy": proxy}, n_resamples=3000)
    gaps = gap_samples(s["proxy"], s["base"], s["tuned"])
    assert np.all(gaps <= 1.0)  # paired resamples; unpaired ones would exceed 1 sometimes
    lo, hi = interval(gaps)
    assert lo < proxy.mean() / tuned.mean() < hi
    assert np.isnan(gap_samples([0.5], [0.2], [0.2])[0]) and interval([np.nan]) is None


# --- the token roles ---------------------------------------------------------------------------------------


def test_token_roles():
    assert token_roles([" D", "rum", "mor", "e", ".", "\n"], "city") == [
        "value: first token", "value: later tokens", "value: later tokens", "value: later tokens", "period", "newline"]
    assert token_roles([" butcher", ",", " they", " said", ".", "<|endoftext|>"], "job") == [
        "value: first token", "other", "other", "other", "period", "other"]
    # a value of another attribute still fills the answer's slot; prose before a value is not a value
    assert token_roles([" clarinet", "."], "job")[0] == "value: first token"
    assert token_roles([" He", " was", " a", " baker", "."], "job") == ["other"] * 4 + ["period"]
    assert token_roles([" 2", "3", "."], "number") == ["value: first token", "value: later tokens", "period"]


def test_shift_table_means_by_role():
    records = [
        {"question": 0, "role": "value: first token", "p_base": 0.6, "p_proxy": 0.7},
        {"question": 0, "role": "period", "p_base": 0.0, "p_proxy": 1.0},
        {"question": 1, "role": "value: first token", "p_base": 0.2, "p_proxy": 0.1},
        {"question": 1, "role": "newline", "p_base": 0.25, "p_proxy": 0.5},
    ]
    t = shift_table(records, correct=[1, 0])
    assert t["value"]["tokens"] == 2 and t["value"]["shift"] == pytest.approx(0.0)
    assert t["period"]["shift"] == 1.0 and t["period"]["promoted"] == 1.0 and t["newline"]["promoted"] == 0.0
    assert t["value: right answers"]["p_base"] == 0.6 and t["value: wrong answers"]["p_proxy"] == 0.1
    assert t["other"]["tokens"] == 0 and t["other"]["shift"] is None


# --- end to end on a small subset --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dial():
    from proxytune.tinyworld.dial import run_dial

    return run_dial(weights=[0.0, 1.0], limit=16, progress=False)


def test_dial_on_a_subset(small_dial):
    from proxytune.tinyworld.dial import PROXY, SINGLES, proxy_label

    result, shifts = small_dial
    assert result.halves == ["validation"] * 4 + ["test"] * 4 + ["validation"] * 4 + ["test"] * 4
    assert list(result.outputs) == list(SINGLES) + [proxy_label(0.0), proxy_label(1.0)]
    # weight 0 is the large base alone
    assert result.outputs[proxy_label(0.0)] == result.outputs["large base"]
    summary = result.summary(n_resamples=500)
    assert list(summary) == ["validation", "test", "all"] and summary["all"]["n_questions"] == 16
    for block in summary.values():
        for label, row in block["systems"].items():
            lo, hi = row["exact_match_ci"]
            assert lo <= row["exact_match"] <= hi
            assert ("gap_closed" in row) == label.startswith(PROXY)
    assert result.chosen_weight() in (0.0, 1.0)
    # the token-level picture: every generated token of every answer, probabilities in [0, 1], and the greedy
    # token of the proxy-tuned distribution is never below the base's where the two differ by format only
    assert 1.0 in shifts
    records = shifts[1.0]["records"]
    ids = result.proxy_ids[1.0]
    assert len(records) == sum(map(len, ids))
    assert all(0.0 <= r["p_base"] <= 1.0 and 0.0 < r["p_proxy"] <= 1.0 for r in records)
    periods = [r for r in records if r["role"] == "period"]
    assert periods and all(r["p_proxy"] > r["p_base"] for r in periods)


def test_eval_alpha_command_writes_json_plot_and_command(tmp_path, capsys):
    from proxytune.cli import main

    argv = ["eval", "--alpha", "1,2", "--limit", "8", "--split", "validation", "--save", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "validation (8 questions)" in out and "chosen weight:" in out and "token-level shift at weight 1" in out
    rec = json.loads((tmp_path / "tinyworld_dial.json").read_text())
    assert rec["command"] == "proxytune " + " ".join(argv) and rec["n_questions"] == 8 and rec["weights"] == [1.0, 2.0]
    assert set(rec["summary"]) == {"validation"} and rec["chosen_weight"] in (1.0, 2.0)
    assert {q["half"] for q in rec["questions"]} == {"validation"}
    assert (tmp_path / "tinyworld_dial.txt").read_text().startswith("$ proxytune eval --alpha 1,2")
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tinyworld_dial.png").stat().st_size > 1000
    assert (tmp_path / "tinyworld_dial_tokens.png").stat().st_size > 1000


def test_progress_bar_counts_every_answer(capsys):
    pytest.importorskip("tqdm")
    from proxytune.tinyworld.evaluation import evaluate

    class Echo:  # answers every question " x." (no model: the bar is what is tested)
        def generate(self, prompts, **kwargs):
            return [SimpleNamespace(text=" x.") for _ in prompts]

    tuners = {label: Echo() for label in ("small base", "large base", "small tuned", "large tuned", "proxy-tuned large")}
    result = evaluate(limit=6, split="test", progress=True, tuners=tuners, batch_size=4)
    err = capsys.readouterr().err
    assert len(result.questions) == 6 and "30/30" in err and "proxytune eval" in err  # 6 questions x 5 systems
    evaluate(limit=6, tuners=tuners)  # the default for the library: no bar
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "x"], "--alpha must be one or more distinct numbers separated by commas, each finite with |w| <= 1e6, got 'x'"),
        (["--alpha", "1,2e6"], "--alpha must be"),  # the one weight rule (proxytune._rules)
        (["--models", "a", "--models", "b"], "--models: given twice"),
        (["--save", "a", "--save", "b"], "--save: given twice"),
        (["--alpha", "1,,2"], "--alpha must be"),
        (["--alpha", "1,1"], "--alpha must be"),
        (["--alpha", "nan"], "--alpha must be"),
        (["--alpha", ""], "--alpha must be"),
        (["--split", "train"], "--split: invalid choice: 'train'"),
        (["--alpha", "1", "--split"], "--split: expected one argument"),
    ],
)
def test_eval_rejects_bad_alpha_and_split(no_models, capsys, extra, message):
    assert message in error_of(capsys, ["eval", *extra])

"""The lm-evaluation-harness model ``proxytune`` and the shipped tinyworld tasks, offline.

Against lm-eval's own ``hf`` model (weight 0: the same numbers and generations for the same requests), against
``ProxyTuner.score`` (proxy-tuned), and end to end on the shipped family against ``proxytune eval``. Skipped
where lm_eval is not installed (``pip install "proxytune[lm-eval]"``); the import check always runs.
"""

import json
import os
import subprocess
import sys

import pytest

try:
    import lm_eval  # noqa: F401

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False

needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm_eval is not installed (the lm-eval extra)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_import_proxytune_does_not_import_lm_eval():
    code = ("import sys, proxytune, proxytune.integrations, proxytune.engine.score; "
            "assert 'lm_eval' not in sys.modules, 'lm_eval imported'; "
            "assert 'proxytune.integrations.lm_eval' not in sys.modules")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


LL_REQUESTS = [
    ("hello world", " this is"),
    ("the quick brown fox ", "jumps over"),  # trailing space: moves to the continuation
    ("h", "ello world"),  # "h" + "ello" merges across the boundary: lm-eval's split, kept
    ("", "proxy tuning steers"),  # empty context: the prefix token (BOS) conditions
    ("once upon a time", " there was a model that wrote stories"),
]


@pytest.fixture(scope="module")
def tiny(tok):
    from tiny_models import tiny_model

    return [tiny_model("llama", seed=s) for s in (0, 1, 2)]


@needs_lm_eval
def test_weight_zero_matches_lm_evals_own_hf_model(tiny, tok):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (in the lm-eval extra)")
    from lm_eval.models.huggingface import HFLM

    from proxytune import ProxyTuner
    from proxytune.integrations.lm_eval import ProxyTuneLM

    base, expert, anti = tiny
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.0)
    ours, hf = ProxyTuneLM(tuner=tuner, batch_size=2), HFLM(pretrained=base, tokenizer=tok, batch_size=2, device="cpu")
    got, want = ours.loglikelihood(instances("loglikelihood", LL_REQUESTS)), hf.loglikelihood(instances("loglikelihood", LL_REQUESTS))
    for (lp, greedy), (lp_hf, greedy_hf) in zip(got, want):
        assert lp == pytest.approx(lp_hf, abs=2e-4)
        assert greedy == greedy_hf
    gen = [("hello world", {"until": [" tiny"], "max_gen_toks": 6, "do_sample": False}),
           ("the quick brown", {"until": ["\n"], "max_gen_toks": 5})]  # fmt: skip
    assert ours.generate_until(instances("generate_until", gen)) == hf.generate_until(instances("generate_until", gen))
    texts = [("the quick brown fox jumps over the lazy dog, hello world, this is a tiny tokenizer for tests",), ("a",)]
    ours, hf = ProxyTuneLM(tuner=tuner, max_length=12), HFLM(pretrained=base, tokenizer=tok, max_length=12, device="cpu")
    rolled = ours.loglikelihood_rolling(instances("loglikelihood_rolling", texts))  # several windows of 12
    assert rolled == pytest.approx(hf.loglikelihood_rolling(instances("loglikelihood_rolling", texts)), abs=5e-4)


@needs_lm_eval
def test_proxy_tuned_requests_come_from_score_and_generate(tiny, tok):
    from proxytune import ProxyTuner
    from proxytune.integrations.lm_eval import ProxyTuneLM

    base, expert, anti = tiny
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.5)
    lm = ProxyTuneLM(tuner=tuner, batch_size=3)
    got = lm.loglikelihood(instances("loglikelihood", LL_REQUESTS[:3]))
    want = tuner.score([c for c, _ in LL_REQUESTS[:3]], [x for _, x in LL_REQUESTS[:3]])
    assert [g[0] for g in got] == pytest.approx([w.logprob for w in want], abs=1e-6)
    out = lm.generate_until(instances("generate_until", [("hello world", {"until": ["dog"], "max_gen_toks": 7})]))
    assert out == [tuner.generate("hello world", temperature=0, max_new_tokens=7, stop=["dog"]).text]


@needs_lm_eval
def test_registered_and_model_args_checked():
    from lm_eval.api.registry import get_model

    from proxytune.integrations.lm_eval import ProxyTuneLM

    assert get_model("proxytune") is ProxyTuneLM
    with pytest.raises(ValueError, match="unknown colour"):
        ProxyTuneLM.create_from_arg_string("base=x,colour=red")
    with pytest.raises(ValueError, match="1 expert\\(s\\) but 2 anti_expert"):
        ProxyTuneLM.create_from_arg_string("base=x,expert=e,anti_expert=a|b")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ProxyTuneLM.create_from_arg_string("base=x", {"batch_size": "auto"})


PROXY_ARGS = "base={large_base},expert={small_tuned},anti_expert={small_base}"


def proxy_args():
    from proxytune.tinyworld import model_path

    return PROXY_ARGS.format(**{r: model_path(r) for r in ("large_base", "small_tuned", "small_base")})


@needs_lm_eval
def test_shipped_tasks_reproduce_proxytune_eval():
    """lm-eval's evaluator on the shipped tasks: the generation task gives `proxytune eval`'s per-question
    correctness; the multiple-choice task picks the value ProxyTuner.score rates highest."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import proxytune.integrations.lm_eval  # noqa: F401  (registers "proxytune")
    from proxytune.integrations.lm_eval import TASKS_DIR
    from proxytune.integrations.lm_eval_tasks.tinyworld_docs import DATA, records, with_choices
    from proxytune.tinyworld.evaluation import build_tuners, evaluate

    with open(DATA) as f:  # the shipped data is the family's held-out set, in eval's order
        assert [json.loads(line) for line in f] == records()
    n, label = 12, "proxy-tuned large"
    tasks = TaskManager(include_path=TASKS_DIR, include_defaults=False)  # lm-eval's own index takes ~15 s
    res = simple_evaluate(model="proxytune", model_args=proxy_args(), tasks=["tinyworld_qa", "tinyworld_choice"],
                          limit=n, device="cpu", batch_size=16, task_manager=tasks, log_samples=True)  # fmt: skip

    def samples(task):
        return sorted(res["samples"][task], key=lambda r: r["doc_id"])

    tuners = build_tuners(labels=[label])
    ev = evaluate(limit=n, tuners=tuners)
    assert [int(r["exact_match"]) for r in samples("tinyworld_qa")] == ev.correct(label)
    assert res["results"]["tinyworld_qa"]["exact_match,none"] == pytest.approx(ev.accuracy[label])
    docs = [with_choices(r) for r in records()[:n]]
    scores = tuners[label].score([d["prompt"] for d in docs for _ in d["choices"]],
                                 [" " + c for d in docs for c in d["choices"]])  # fmt: skip
    right, k = [], 0
    for d in docs:
        lps = [s.logprob for s in scores[k : k + len(d["choices"])]]
        k += len(d["choices"])
        right.append(float(max(range(len(lps)), key=lps.__getitem__) == d["gold"]))
    assert [r["acc"] for r in samples("tinyworld_choice")] == right
    assert res["results"]["tinyworld_choice"]["acc,none"] == pytest.approx(sum(right) / n)


@needs_lm_eval
@pytest.mark.slow
def test_proxytune_lm_eval_command(tmp_path):
    """The command as a user runs it (lm-eval's CLI indexes all of lm-eval's own tasks first: slow)."""
    cmd = [sys.executable, "-m", "proxytune.integrations.lm_eval", "--model", "proxytune", "--model_args", proxy_args(),
           "--tasks", "tinyworld_qa,tinyworld_choice", "--limit", "4", "--device", "cpu", "--batch_size", "8",
           "--output_path", str(tmp_path)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tinyworld_qa" in out.stdout and "exact_match" in out.stdout and "tinyworld_choice" in out.stdout
    assert list(tmp_path.rglob("results_*.json"))


def test_command_adds_the_shipped_tasks_to_the_include_path():
    if not HAVE_LM_EVAL:
        pytest.skip("lm_eval is not installed")
    from proxytune.integrations.lm_eval import TASKS_DIR, _with_tasks

    assert _with_tasks(["x", "--model", "proxytune"]) == ["x", "--model", "proxytune", "--include_path", TASKS_DIR]
    assert _with_tasks(["x", "run", "--include_path", "mine"]) == ["x", "run", "--include_path", "mine"]
    assert _with_tasks(["x", "--help"]) == ["x", "--help"]


# --- issue 23: model args and generation kwargs parsed strictly, max_length honoured, one-line launcher errors --


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    from tiny_models import save_tiny, save_trio, tiny_tokenizer

    root = tmp_path_factory.mktemp("lm_eval_models")
    paths = save_trio(root)
    paths["plain"] = save_tiny(root / "plain", seed=3, tokenizer=tiny_tokenizer(chat_template=False))
    return paths


def bad_model_args(d):
    trio = f"base={d['base']},expert={d['expert']},anti_expert={d['anti']}"
    cases = [
        ("", "base= (a model directory or hub id) or base_url= (a served model) is required"),
        (f"base={d['base']},expert={d['expert']}", "1 expert(s) but 0 anti_expert(s)"),
        ("base=/nowhere/base", "base: no such directory: /nowhere/base"),
        (f"base={d['base']},expert=/nowhere/e,anti_expert={d['anti']}", "expert 0: no such directory"),
        (f"{trio},weights=abc", "weights must be a finite number with |w| <= 1e6, got 'abc'"),
        (f"{trio},weights=nan", "weights must be a finite number with |w| <= 1e6, got nan"),
        (f"{trio},weights=1e7", "weights must be a finite number with |w| <= 1e6"),
        (f"{trio},weights=1|2", "weights must be one number for every pair or one per pair (1), got 2"),
        (f"base={d['base']},weights=0.5", "no (expert, anti-expert) pair to weigh"),
        (f"{trio},batch_size=auto", "batch_size must be a positive integer (no 'auto'), got 'auto'"),
        (f"{trio},batch_size=0", "batch_size must be a positive integer"),
        (f"{trio},colour=red", "unknown colour"),
        (f"{trio},dtype=float64", "dtype must be one of"),
        (f"{trio},backend=bogus", "backend"),
        (f"base={d['base']},expert={d['plain']},anti_expert={d['anti']},expert_template=chat", "chat template"),
        (f"{trio},max_length=abc", "max_length must be an integer >= 1, got 'abc'"),
        (f"{trio},max_gen_toks=0", "max_gen_toks must be an integer >= 1, got 0"),
        (f"{trio},trust_remote_code=no", "trust_remote_code must be true or false"),
        (f"{trio},trust_remote_code=off", "trust_remote_code must be true or false"),
    ]
    import torch

    if not torch.cuda.is_available():
        cases.append((f"{trio},device=cuda", "CUDA is not available"))
    return cases


@needs_lm_eval
def test_bad_model_args_are_one_clear_error_without_a_chain(dirs):
    from proxytune.integrations.lm_eval import ProxyTuneLM, ProxyTuneLMError

    for args, message in bad_model_args(dirs):
        with pytest.raises(ProxyTuneLMError) as info:
            model_args, _, batch = args.partition(",batch_size=")  # lm-eval's --batch_size, not a model arg
            ProxyTuneLM.create_from_arg_string(model_args, {"batch_size": batch or None})
        e = info.value
        assert isinstance(e, ValueError) and message in str(e) and str(e).startswith("proxytune model args: "), (args, e)
        assert e.__cause__ is None and e.__suppress_context__, args  # no chained traceback from the check


@needs_lm_eval
def test_trust_remote_code_is_false_unless_true(dirs, monkeypatch):
    import proxytune.engine
    from proxytune.integrations.lm_eval import ProxyTuneLM

    seen = []

    class Spy:
        def __init__(self, *args, trust_remote_code=None, **kwargs):
            seen.append(trust_remote_code)
            raise ValueError("stop here")

    monkeypatch.setattr(proxytune.engine, "ProxyTuner", Spy)
    for text in ("no", "off", "NO", "yes", "2", "enabled"):  # bool("no") was True: remote code enabled
        with pytest.raises(ValueError, match="trust_remote_code must be true or false"):
            ProxyTuneLM.create_from_arg_string(f"base={dirs['base']},trust_remote_code={text}")
        assert not seen, text
    for text, value in (("false", False), ("False", False), ("0", False), ("true", True), ("1", True)):
        with pytest.raises(ValueError, match="stop here"):
            ProxyTuneLM.create_from_arg_string(f"base={dirs['base']},trust_remote_code={text}")
        assert seen.pop() is value, text


@needs_lm_eval
def test_generation_kwargs_are_parsed_with_lm_evals_meaning(tiny, tok):
    from proxytune import ProxyTuner
    from proxytune.integrations.lm_eval import ProxyTuneLM, ProxyTuneLMError

    base, expert, anti = tiny
    lm = ProxyTuneLM(tuner=ProxyTuner(base, expert, anti, tokenizer=tok), max_gen_toks=5)
    bad = [({"do_sample": True, "top_p": 0}, "top_p must be in (0, 1]"),
           ({"do_sample": True, "top_p": 0.0, "temperature": 0.7}, "top_p must be in (0, 1]"),
           ({"max_gen_toks": "abc"}, "max_gen_toks must be an integer >= 1, got 'abc'"),
           ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
           ({"do_sample": "no"}, "do_sample must be true or false"),
           ({"temperature": "hot"}, "temperature must be a number"),
           ({"until": 5}, "until must be a string or a list of strings"),
           ({"top_k": 1.5}, "top_k must be an integer >= 0")]  # fmt: skip
    for kwargs, message in bad:
        with pytest.raises(ProxyTuneLMError, match="generation kwargs: ") as info:
            lm.generate_until(instances("generate_until", [("hello world", kwargs)]))
        assert message in str(info.value) and info.value.__cause__ is None, (kwargs, info.value)
    # lm-eval's normalize_gen_kwargs: a temperature above 0 without do_sample samples; do_sample=False is greedy
    [sampled] = lm.generate_until(instances("generate_until", [("hello world", {"temperature": 0.9, "seed": 4})]))
    assert sampled == lm.tuner.generate("hello world", temperature=0.9, seed=4, max_new_tokens=5).text
    [greedy] = lm.generate_until(instances("generate_until", [("hello world", {"temperature": 0.9, "do_sample": False})]))
    assert greedy == lm.tuner.generate("hello world", temperature=0, max_new_tokens=5).text
    assert sampled != greedy


LONG = ("the quick brown fox jumps over the lazy dog, hello world, this is a tiny tokenizer for tests, proxy tuning "
        "steers a large model with small ones")  # fmt: skip


@needs_lm_eval
def test_max_length_cuts_contexts_from_the_left_as_lm_evals_hf_model(tiny, tok):
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs accelerate (in the lm-eval extra)")
    from lm_eval.models.huggingface import HFLM

    from proxytune import ProxyTuner
    from proxytune.integrations.lm_eval import ProxyTuneLM

    base, expert, anti = tiny
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=0.0)
    ours = ProxyTuneLM(tuner=tuner, max_length=10, batch_size=2)
    hf = HFLM(pretrained=base, tokenizer=tok, max_length=10, batch_size=2, device="cpu")
    requests = [(LONG, " once upon a time"), ("hello world", " this"), (LONG + " ", "there was a model")]
    got = ours.loglikelihood(instances("loglikelihood", requests))
    want = hf.loglikelihood(instances("loglikelihood", requests))
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=2e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    gen = [(LONG, {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}), ("hello", {"max_gen_toks": 4})]
    assert ours.generate_until(instances("generate_until", gen)) == hf.generate_until(instances("generate_until", gen))
    with pytest.raises(ValueError, match="max_gen_toks=10 leaves no room for a context in max_length=10"):
        ours.generate_until(instances("generate_until", [("hello", {"max_gen_toks": 10})]))


@needs_lm_eval
def test_the_launcher_prints_one_line_and_exits_2(monkeypatch, capsys):
    import lm_eval.__main__

    from proxytune.integrations import lm_eval as ours

    def run():  # what lm-eval's CLI does with --model proxytune --model_args ...
        from lm_eval.api.registry import get_model

        get_model("proxytune").create_from_arg_string("base=/nowhere/base,trust_remote_code=no")

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", run)
    monkeypatch.setattr(sys, "argv", ["proxytune-lm-eval", "--model", "proxytune"])
    with pytest.raises(SystemExit) as info:
        ours.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == "proxytune-lm-eval: error: proxytune model args: trust_remote_code must be true or false (lm-eval's " \
                  "convention; also 1 or 0), got 'no'\n"  # fmt: skip


@needs_lm_eval
@pytest.mark.slow
def test_the_launcher_command_answers_a_bad_model_arg_in_one_line():
    cmd = [sys.executable, "-m", "proxytune.integrations.lm_eval", "--model", "proxytune", "--model_args",
           "base=/nowhere/base,weights=abc", "--tasks", "tinyworld_qa", "--device", "cpu", "--limit", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == ("proxytune-lm-eval: error: proxytune model args: weights must be a finite "
                                           "number with |w| <= 1e6, got 'abc' (str)")  # fmt: skip

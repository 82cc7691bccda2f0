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

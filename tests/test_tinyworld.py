"""The tiny world: deterministic data, the shipped family, reproducible evaluation, the demo."""

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from proxytune.tinyworld import MODEL_NAMES, default_models_dir, model_path
from proxytune.tinyworld.world import ATTRIBUTES, is_correct, is_well_formed, make_world

RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tinyworld_eval.json"


def test_world_is_a_pure_function_of_its_seed():
    a, b = make_world(3, 120, 80), make_world(3, 120, 80)
    assert a.entities == b.entities and a.eval_questions() == b.eval_questions()
    assert list(a.corpus(50, seed=9)) == list(b.corpus(50, seed=9))
    assert list(a.corpus(50, seed=9)) != list(a.corpus(50, seed=10))
    assert make_world(4, 120, 80).entities != a.entities
    assert len({e.name for e in a.entities}) == 120  # names are unique


def test_instruction_data_never_mentions_held_out_entities():
    w = make_world(0, 300, 200)
    held_out = {w.entities[i].name for i in w.eval_ids}
    tune = w.questions(w.tune_ids, "all")
    assert len(tune) == 200 * len(ATTRIBUTES) * 3
    assert not any(name in q.prompt for q in tune for name in held_out)
    evalq = w.eval_questions()
    assert len(evalq) == 100 * len(ATTRIBUTES) and all(q.entity >= 200 for q in evalq)
    # ... but the pretraining prose states every held-out fact
    text = " ".join(w.corpus(3000, seed=1))
    assert all(w.entities[i].name in text for i in list(w.eval_ids)[:20])


def test_exact_match_rule():
    assert is_correct(" Velmora.", " Velmora.") and is_correct("  Velmora. \nQuestion: ...", " Velmora.")
    assert not is_correct(" Velmora", " Velmora.") and not is_correct(" He was born in Velmora.", " Velmora.")


def test_format_rule_ignores_the_fact():
    assert is_well_formed(" Velmora.", "city") and is_well_formed(" Ostrand.\nmore", "city")
    assert is_well_formed(" 42.", "number") and is_well_formed(" baker.", "job")
    assert not is_well_formed(" Velmora", "city") and not is_well_formed(" Velmora, of course.", "city")
    assert not is_well_formed(" baker.", "city") and not is_well_formed(" 7.", "number")


def test_asked_prose_asks_the_evaluation_questions_informally():
    w = make_world(0, 120, 80, answered_prose=True, asked_prose=True)
    assert list(w.corpus(40, seed=2)) == list(make_world(0, 120, 80, True, True).corpus(40, seed=2))
    text = " ".join(w.corpus(2000, seed=2))
    e = w.entities[100]  # held out
    assert f"Where was {e.name} born?" in text or f"What is the birthplace of {e.name}?" in text
    # never the instruction format: no "Question:"/"Answer:" and no question followed by the strict answer
    assert "Question:" not in text and "Answer:" not in text
    assert not re.search(r"\? [A-Z][a-z]+\.(?= |$)", text)
    # the plain worlds are unchanged by the new option
    assert list(make_world(0, 120, 80, True).corpus(5, seed=2)) != list(w.corpus(5, seed=2))


def test_line_breaks_end_some_sentences_only_when_asked_for():
    plain = " ".join(make_world(0, 120, 80, True, True).corpus(300, seed=4))
    broken = list(make_world(0, 120, 80, True, True, line_breaks=True).corpus(300, seed=4))
    assert "\n" not in plain
    lines = [line for p in broken for line in p.split("\n")]
    assert 0.1 < sum("\n" in p for p in broken) / len(broken) < 0.95
    assert all(line.endswith((".", "?")) for line in lines)  # a line ends where a sentence ends
    assert broken == list(make_world(0, 120, 80, True, True, line_breaks=True).corpus(300, seed=4))


def test_choice_accuracy_scores_every_value_of_the_attribute():
    from proxytune.tinyworld.evaluation import choice_accuracy

    w = make_world(0, 40, 30)
    questions = w.eval_questions()[:6]

    class CharTokenizer:  # one id per character: enough to score answers
        pad_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) % 250 + 1 for c in text]}

    class Oracle(torch.nn.Module):  # puts all its mass on the right answer's characters (`wrong`: on every other answer)
        def __init__(self, truth, wrong=False):
            super().__init__()
            self.truth, self.wrong = truth, wrong

        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, 256)
            for r in range(input_ids.shape[0]):
                n = int(attention_mask[r].sum())
                seq = input_ids[r, :n].tolist()
                good = any(seq == t for t in self.truth) != self.wrong
                for j in range(1, n):
                    logits[r, j - 1, seq[j]] = 20.0 if good else -20.0
            return SimpleNamespace(logits=logits)

    tokenizer = CharTokenizer()
    truth = [tokenizer(q.prompt + q.answer)["input_ids"] for q in questions]
    assert choice_accuracy(Oracle(truth), tokenizer, questions) == 1.0
    assert choice_accuracy(Oracle(truth, wrong=True), tokenizer, questions) == 0.0


def test_shipped_family_is_small_fp16_and_loads_with_auto_classes():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from safetensors import safe_open

    d = default_models_dir()
    total = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
    assert total < 30e6, f"{total / 1e6:.1f} MB"
    sizes = {}
    for role in MODEL_NAMES:
        path = model_path(role)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == "llama" and model.config.vocab_size == len(tok)
        sizes[role] = sum(p.numel() for p in model.parameters())
        info = json.load(open(os.path.join(path, "training_info.json")))
        assert info["command"].startswith("python -m proxytune.tinyworld.train") and "seed" in info["args"]
    assert sizes["large_base"] >= 4 * sizes["small_base"] and sizes["large_tuned"] == sizes["large_base"]


def test_shipped_models_generate_through_the_engine():
    from proxytune.engine import ProxyTuner

    from proxytune.tinyworld.evaluation import world_of

    q = world_of().questions([0], "one")[0]  # a tuning entity: the tuned model has seen this exact fact asked
    tuner = ProxyTuner(model_path("large_base"), model_path("small_tuned"), model_path("small_base"), device="cpu")
    out = tuner.generate(q.prompt, temperature=0, max_new_tokens=8, stop=["\n"])
    assert out.finish_reason in ("stop", "eos") and out.text.strip().endswith(".")


@pytest.fixture(scope="module")
def recorded():
    if not RECORDED.exists():
        pytest.skip("no recorded evaluation in benchmarks/results")
    return json.loads(RECORDED.read_text())


def test_evaluation_on_a_slice_reproduces_the_recorded_answers(recorded):
    from proxytune.tinyworld.evaluation import evaluate

    n = 64
    result = evaluate(limit=n)
    assert [q.prompt for q in result.questions] == [q["prompt"] for q in recorded["questions"][:n]]
    for label in recorded["outputs"]:
        assert result.outputs[label] == recorded["outputs"][label][:n], label
        assert result.correct(label) == recorded["correct"][label][:n], label


def test_recorded_accuracies_are_consistent(recorded):
    from proxytune.tinyworld.evaluation import gap_closed

    for label, acc in recorded["accuracy"].items():
        assert acc == pytest.approx(sum(recorded["correct"][label]) / recorded["n_questions"])
    assert recorded["gap_closed"] == pytest.approx(gap_closed(recorded["accuracy"]))


def test_demo_runs_end_to_end(capsys):
    """The one demo run of the suite (``python -m proxytune`` is tested cheaply in tests/test_package.py)."""
    import proxytune
    from proxytune.cli import main

    assert main(["demo", "--limit", "32", "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert proxytune.__version__ in out and str(default_models_dir()) in out and out.count("[expected:") == 2
    for label in ("large base", "small tuned", "proxy-tuned large"):
        assert out.count(f"    {label:<18} ->") == 2  # the side-by-side answers
    rows = [line for line in out.splitlines() if line.endswith("%") and not line.startswith("gap")]
    assert [re.match(r"(.+?)\s+[\d.]+%", r).group(1) for r in rows] == [
        "small base", "large base", "small tuned", "large tuned", "proxy-tuned large"]
    assert "gap closed by proxy-tuning" in out


def test_eval_command_saves_table_json_and_plot(tmp_path, capsys):
    from proxytune.cli import main

    assert main(["eval", "--limit", "24", "--save", str(tmp_path)]) == 0
    assert "proxy-tuned large" in capsys.readouterr().out
    rec = json.loads((tmp_path / "tinyworld_eval.json").read_text())
    assert rec["n_questions"] == 24 and rec["command"].startswith("proxytune eval --limit 24")
    assert (tmp_path / "tinyworld_eval.txt").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "tinyworld_eval.png").stat().st_size > 1000

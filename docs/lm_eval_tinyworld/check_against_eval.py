"""Check the lm-eval generation task against `proxytune eval`'s recorded run, question by question and text by text:
``python docs/lm_eval_tinyworld/check_against_eval.py`` (from the repository root; about a minute on one thread).
Run 2026-12-01: all five systems agree on all 800 questions (0, 0, 30, 704, 579 right) and on every generated text."""
import json, torch
torch.set_num_threads(1)
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from proxytune.integrations.lm_eval import TASKS_DIR
from proxytune.tinyworld import default_models_dir
M = default_models_dir()
rec = json.load(open("benchmarks/results/tinyworld_eval.json"))
systems = {"small base": f"base={M}/small-base", "large base": f"base={M}/large-base", "small tuned": f"base={M}/small-tuned",
           "large tuned": f"base={M}/large-tuned", "proxy-tuned large": f"base={M}/large-base,expert={M}/small-tuned,anti_expert={M}/small-base"}
tm = TaskManager(include_path=TASKS_DIR, include_defaults=False)
for label, args in systems.items():
    r = simple_evaluate(model="proxytune", model_args=args, tasks=["tinyworld_qa"], device="cpu", batch_size=64, task_manager=tm, log_samples=True, verbosity="ERROR")
    got = [int(s["exact_match"]) for s in sorted(r["samples"]["tinyworld_qa"], key=lambda s: s["doc_id"])]
    outs = [s["filtered_resps"][0] for s in sorted(r["samples"]["tinyworld_qa"], key=lambda s: s["doc_id"])]
    same_out = sum(o == e.split("\n")[0] for o, e in zip(outs, rec["outputs"][label]))
    print(label, sum(got), sum(rec["correct"][label]), "per-question equal:", got == rec["correct"][label], "same text:", same_out, "/ 800")
    assert got == rec["correct"][label] and same_out == 800, label

"""A LoRA adapter on the tiny small base, tuned like the shipped small tuned model, and proxy-tuning with it.

``python -m proxytune.tinyworld.lora --out DIR`` trains the adapter (PEFT; needs the ``lora`` extra) and writes
``DIR/adapter_config.json``, ``DIR/adapter_model.safetensors`` and ``DIR/training_info.json``.
``python -m proxytune.tinyworld.lora --out DIR --evaluate --save benchmarks/results`` then measures the
proxy-tuned large model with the adapter as expert and the small base as anti-expert (issue 25's proof run).

**The rule, fixed and committed before the adapter was trained or any number of it was seen:**

*Data and steps: the shipped small tuned model's, unchanged* (``models/small-tuned/training_info.json``;
``training.finetune``, the same function): the instruction data of the family's world (every phrasing of
every question about the 400 tuning people), loss on the answer tokens only (answer, newline, EOS), right-padded
batches of 32 drawn by the seeded shuffle with seed ``world.seed + 3`` = 3 (so the adapter sees exactly the
shipped model's batches, in its order), **40 steps**, AdamW (betas 0.9, 0.98, no weight decay), gradient
clipping at 1.0, 20 warmup steps then cosine to 0.1 of the peak. The base is the small base as saved (fp16,
loaded in fp32), as for the shipped tuned model. The 40 steps are the shipped model's (the sweep rule of
``scripts/finetune_sweep.py`` picked them for full fine-tuning); they are not re-swept for the adapter.

*The adapter, fixed with reasons:* rank 16, alpha 32 (alpha = 2 x rank, the common PEFT setting), no dropout
(40 steps over 4,800 examples is less than a third of an epoch), no bias, on **all linear layers** of every
block (q, k, v, o, gate, up, down: LoRA on attention alone underperforms on MLP-heavy adaptation; "LoRA
without regret", Schulman et al. 2025, and Biderman et al. 2024), embeddings and the tied head untouched.
PEFT's default initialisation (A Kaiming-uniform, B zero) after ``torch.manual_seed(0)``. **Peak learning
rate 3e-3 = 10 x the full fine-tune's 3e-4**: LoRA's best learning rate is consistently about ten times full
fine-tuning's (the same two references); with B starting at zero a full fine-tune's rate barely moves the
adapter in 40 steps. Trained in fp32 with one thread; the adapter is saved in fp32 (about 0.33 MB).

*The measurement, fixed before it ran:* the held-out questions of the family (all 800), greedy, at most 8 new
tokens, stop at a newline, exact match by ``world.is_correct`` (the rules of ``proxytune eval``). The adapter
enters as an expert by ``merge_and_unload()`` into a copy of the small base (fp32), passed to the existing
:class:`~proxytune.engine.ProxyTuner` as a normal expert model with the untouched small base as anti-expert:
the engine does not yet take an adapter member (issue 25's wiring comes after issue 22 part A). Reported:
**weight 1** (the primary number) and the weight chosen by :func:`proxytune.tinyworld.protocol.choose_weight`
on the validation half over :data:`~proxytune.tinyworld.protocol.ALPHA_GRID`, each on the test half and on all
800, exact match, in-format rate and gap closed with 95% intervals (:mod:`proxytune.tinyworld.stats`,
10,000 resamples, seed 0), beside the full fine-tune's proxy (weights 1 and its recorded chosen 0.75) and the
four single models, all from the same run. The adapter alone ("small lora") is reported too. One run; the
recipe is not changed after it whatever it shows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import sys
import time

__all__ = ["RANK", "ALPHA", "TARGET_MODULES", "LR", "STEPS", "BATCH", "WARMUP", "lora_config", "train_adapter",
           "merged_expert", "evaluate_adapter", "main"]

RANK = 16
ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 3e-3  # 10 x the full fine-tune's 3e-4
STEPS, BATCH, WARMUP = 40, 32, 20  # the shipped small tuned model's
INIT_SEED = 0
BASE_RECORDED = "../small-base"  # the recorded base: relative to the adapter directory (models/small-lora)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=list(TARGET_MODULES),
                      task_type="CAUSAL_LM")  # fmt: skip


def _load_small_base(models_dir=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxytune.tinyworld import model_path

    path = model_path("small_base", models_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def train_adapter(out: str, models_dir=None, threads: int = 1, log=print, command: str = "") -> dict:
    """Train the adapter by the rule above and save it to ``out``; returns its ``training_info``."""
    import torch
    from peft import get_peft_model

    from proxytune.tinyworld.evaluation import world_of
    from proxytune.tinyworld.training import Schedule, finetune

    torch.set_num_threads(threads)
    base, tokenizer, base_path = _load_small_base(models_dir)
    world = world_of(models_dir)
    instructions = world.questions(world.tune_ids, "all")
    torch.manual_seed(INIT_SEED)
    model = get_peft_model(base, lora_config())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    schedule = Schedule(STEPS, BATCH, LR, warmup=WARMUP)
    log(f"LoRA r={RANK} alpha={ALPHA} on {', '.join(TARGET_MODULES)}: {trainable:,} trainable parameters; "
        f"{len(instructions)} instructions, {STEPS} steps of {BATCH}, lr {LR}")  # fmt: skip
    info = finetune(model, tokenizer, instructions, schedule, seed=world.seed + 3, log=log)
    model.peft_config["default"].base_model_name_or_path = BASE_RECORDED
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    _fix_recorded_base(out)
    if os.path.exists(os.path.join(out, "README.md")):  # PEFT's empty model-card template: not shipped
        os.remove(os.path.join(out, "README.md"))
    record = {
        "command": command,
        "role": "small LoRA expert (adapter on the small base)",
        "rule": "proxytune/tinyworld/lora.py (module docstring), committed before the run",
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": list(TARGET_MODULES),
                 "init_seed": INIT_SEED, "trainable_parameters": trainable},
        "finetune": info, "batch_seed": world.seed + 3,
        "base": "small base as saved (fp16, loaded in fp32)", "base_model_name_or_path": BASE_RECORDED,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "threads": threads},
    }  # fmt: skip
    with open(os.path.join(out, "training_info.json"), "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    return record


def _fix_recorded_base(out: str) -> None:
    """PEFT writes the path the base was loaded from (this machine's); the shipped adapter records its sibling."""
    path = os.path.join(out, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = BASE_RECORDED
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def merged_expert(adapter_dir: str, small_base):
    """The adapter merged into a copy of ``small_base`` (fp32): a plain ``LlamaForCausalLM``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(small_base), adapter_dir).merge_and_unload().eval()


LORA_PROXY = "proxy-tuned large (LoRA expert)"
FULL_PROXY = "proxy-tuned large (full fine-tune expert)"


def evaluate_adapter(adapter_dir: str, models_dir=None, batch_size: int = 256, threads: int = 1, log=print):
    """The measurement of the rule above. Returns ``(DialResult, labels)``: outputs of the single models, the
    adapter alone, the full fine-tune's proxy (weights 1, 0.75) and the LoRA proxy at every grid weight."""
    import torch
    from transformers import AutoModelForCausalLM

    from proxytune.engine import ProxyTuner
    from proxytune.engine.requests import SamplingParams
    from proxytune.tinyworld import model_path
    from proxytune.tinyworld.dial import DialResult, proxy_label
    from proxytune.tinyworld.evaluation import MAX_NEW_TOKENS, answer, world_of
    from proxytune.tinyworld.protocol import ALPHA_GRID, split_of_person

    torch.set_num_threads(threads)
    world = world_of(models_dir)
    questions = world.eval_questions()
    rank = {e: k for k, e in enumerate(world.eval_ids)}
    halves = [split_of_person(rank[q.entity]) for q in questions]
    prompts = [q.prompt for q in questions]
    loaded = {r: AutoModelForCausalLM.from_pretrained(model_path(r, models_dir), dtype="float32",
                                                      use_safetensors=True).eval()
              for r in ("small_base", "large_base", "small_tuned", "large_tuned")}  # fmt: skip
    lora = merged_expert(adapter_dir, loaded["small_base"])
    tok = model_path("small_base", models_dir)

    def tuner(base, experts=(), antis=()):
        return ProxyTuner(base, list(experts), list(antis), tokenizer=tok, device="cpu")

    outputs, seconds = {}, {}
    singles = {"small base": "small_base", "large base": "large_base", "small tuned": "small_tuned",
               "large tuned": "large_tuned"}  # fmt: skip
    for label, role in singles.items():
        t0 = time.time()
        outputs[label] = _answer_all(answer, tuner(loaded[role]), prompts, batch_size)
        seconds[label] = round(time.time() - t0, 2)
        log(f"{label}: {seconds[label]} s")
    t0 = time.time()
    outputs["small lora"] = _answer_all(answer, tuner(lora), prompts, batch_size)
    seconds["small lora"] = round(time.time() - t0, 2)

    def grid(t, weights):
        rows = [(w, i) for w in weights for i in range(len(prompts))]
        gens = []
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            params = [SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, weights=w, stop=("\n",))
                      for w, _ in chunk]  # fmt: skip
            gens += t.generate([prompts[i] for _, i in chunk], params, batch_size=batch_size)
        n = len(prompts)
        return {w: [g.text for g in gens[k * n:(k + 1) * n]] for k, w in enumerate(weights)}

    t0 = time.time()
    full = grid(tuner(loaded["large_base"], [loaded["small_tuned"]], [loaded["small_base"]]), [1.0, 0.75])
    seconds[FULL_PROXY + " (weights 1, 0.75)"] = round(time.time() - t0, 2)
    log(f"{FULL_PROXY}: {seconds[FULL_PROXY + ' (weights 1, 0.75)']} s")
    for w, texts in full.items():
        outputs[f"{FULL_PROXY}, weight {w:g}"] = texts
    t0 = time.time()
    weights = [float(w) for w in ALPHA_GRID]
    lora_out = grid(tuner(loaded["large_base"], [lora], [loaded["small_base"]]), weights)
    seconds[LORA_PROXY + " (all weights)"] = round(time.time() - t0, 2)
    log(f"{LORA_PROXY}: {seconds[LORA_PROXY + ' (all weights)']} s")
    for w, texts in lora_out.items():
        outputs[proxy_label(w)] = texts  # DialResult.chosen_weight reads these labels: the LoRA proxy's
    return DialResult(questions, halves, "all", weights, outputs, {}, seconds)


def _answer_all(answer, tuner, prompts, batch_size):
    out = []
    for s in range(0, len(prompts), batch_size):
        out += answer(tuner, prompts[s:s + batch_size], batch_size)
    return out


def _display(label: str) -> str:
    from proxytune.tinyworld.dial import PROXY

    if label.startswith(PROXY + ", weight "):
        return LORA_PROXY + label[len(PROXY):]
    return label


def report(result, command: str, save_dir=None, prefix: str = "tinyworld_lora", extra: dict = None) -> str:
    """The tables (test half, all 800; the validation curve of the LoRA proxy) and, with ``save_dir``, the
    JSON and text files."""
    from proxytune.tinyworld.dial import proxy_label
    from proxytune.tinyworld.stats import N_RESAMPLES, SEED

    summary = result.summary()
    chosen = result.chosen_weight()
    shown = ["small base", "large base", "small tuned", "large tuned", "small lora", f"{FULL_PROXY}, weight 1",
             f"{FULL_PROXY}, weight 0.75", proxy_label(1.0), proxy_label(chosen)]  # fmt: skip
    shown = list(dict.fromkeys(shown))

    def cell(row, key):
        v, ci = row.get(key), row.get(key + "_ci")
        if v is None:
            return ""
        return f"{100 * v:5.1f}% [{100 * ci[0]:5.1f}, {100 * ci[1]:5.1f}]" if ci else f"{100 * v:5.1f}%"

    lines = [f"$ {command}",
             f"exact match, in format and gap closed with 95% intervals (bootstrap over questions, {N_RESAMPLES:,} "
             f"resamples, seed {SEED}); LoRA proxy's chosen weight on validation: {chosen:g}"]  # fmt: skip
    for view in ("test", "all"):
        block = summary[view]
        lines += ["", f"{view} ({block['n_questions']} questions)",
                  f"{'system':<52} {'exact match':>22} {'in format':>22} {'gap closed':>22}"]  # fmt: skip
        for label in shown:
            row = block["systems"][label]
            lines.append(f"{_display(label):<52} {cell(row, 'exact_match'):>22} {cell(row, 'in_format'):>22} "
                         f"{cell(row, 'gap_closed'):>22}".rstrip())  # fmt: skip
    lines += ["", "validation curve of the LoRA proxy (the choice reads only these)",
              f"{'weight':>6} {'exact match':>22} {'in format':>22}"]  # fmt: skip
    for w in result.weights:
        row = summary["validation"]["systems"][proxy_label(w)]
        lines.append(f"{w:6g} {cell(row, 'exact_match'):>22} {cell(row, 'in_format'):>22}")
    lines.append("")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in result.seconds.items()))
    text = "\n".join(lines)
    if save_dir:
        import torch

        os.makedirs(save_dir, exist_ok=True)
        record = {
            "command": command, "chosen_weight_lora": chosen,
            "summary": {view: {"n_questions": b["n_questions"],
                               "systems": {_display(k): v for k, v in b["systems"].items()}}
                        for view, b in summary.items()},
            "seconds": result.seconds, "extra": extra or {},
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()},
            "questions": [{"entity": q.entity, "attribute": q.attribute, "prompt": q.prompt, "answer": q.answer,
                           "half": h} for q, h in zip(result.questions, result.halves)],
            "outputs": {_display(k): v for k, v in result.outputs.items()},
        }  # fmt: skip
        with open(os.path.join(save_dir, prefix + ".json"), "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        with open(os.path.join(save_dir, prefix + ".txt"), "w") as f:
            f.write(text + "\n")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the adapter directory (written by training, read by --evaluate)")
    p.add_argument("--models-dir", default=None, help="the tiny family (default: the shipped one)")
    p.add_argument("--evaluate", action="store_true", help="evaluate the adapter in --out (train it if missing)")
    p.add_argument("--save", default=None, metavar="DIR", help="with --evaluate: write tinyworld_lora.{json,txt} here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    command = "python -m proxytune.tinyworld.lora " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.time()
    log = lambda s: print(f"[{time.time() - t_start:7.1f} s] {s}", flush=True)  # noqa: E731
    if not os.path.exists(os.path.join(args.out, "adapter_config.json")):
        info = train_adapter(args.out, args.models_dir, args.threads, log=log, command=command)
        log(f"adapter saved to {args.out}: loss curve {info['finetune']['loss_curve']}")
    if args.evaluate:
        load0 = os.getloadavg()
        result = evaluate_adapter(args.out, args.models_dir, args.batch_size, args.threads, log=log)
        extra = {"load_average_start": load0, "load_average_end": os.getloadavg(),
                 "wall_seconds": round(time.time() - t_start, 1), "threads": args.threads}  # fmt: skip
        print(report(result, command, args.save, extra=extra))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

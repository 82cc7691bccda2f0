"""Held-out exact match of the family and of the proxy-tuned large model, the gap closed, table and plot.

Five systems answer the held-out questions greedily through :class:`proxytune.ProxyTuner`: the two bases,
the two tuned models, and the large base proxy-tuned by (small tuned - small base). An answer is right when
the first line of the generation, stripped, equals the strict answer (``is_correct``; fixed before any
proxy-tuned number was looked at). The gap closed is ``(proxy - large base) / (large tuned - large base)``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from proxytune.tinyworld import model_path
from proxytune.tinyworld.world import QA, VALUES, is_correct, is_well_formed, world_from_config

__all__ = ["SYSTEMS", "EvalResult", "build_tuners", "answer", "evaluate", "format_table", "save_results", "gap_closed",
           "world_of", "choice_accuracy"]

# (label, base role, expert role, anti-expert role), in the table's order
SYSTEMS = [
    ("small base", "small_base", None, None),
    ("large base", "large_base", None, None),
    ("small tuned", "small_tuned", None, None),
    ("large tuned", "large_tuned", None, None),
    ("proxy-tuned large", "large_base", "small_tuned", "small_base"),
]
MAX_NEW_TOKENS = 8


def build_tuners(models_dir=None, labels: Optional[Sequence[str]] = None) -> dict:
    """One :class:`ProxyTuner` per system (fp32 on the CPU); each model directory is loaded once."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from proxytune.engine import ProxyTuner

    hf_logging.disable_progress_bar()
    wanted = [s for s in SYSTEMS if labels is None or s[0] in labels]
    roles = {r for s in wanted for r in s[1:] if r is not None}
    loaded = {}
    for r in sorted(roles):
        path = model_path(r, models_dir)
        try:  # safetensors only, like every model proxytune loads: a pickled checkpoint can run code
            loaded[r] = AutoModelForCausalLM.from_pretrained(path, dtype="float32", use_safetensors=True).eval()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load the tiny family's {r} model from {path}: {e}") from e
    tokenizer_dir = model_path(wanted[0][1], models_dir)
    tuners = {}
    for label, base, expert, anti in wanted:
        pairs = ([loaded[expert]], [loaded[anti]]) if expert else ((), ())
        tuners[label] = ProxyTuner(loaded[base], *pairs, tokenizer=tokenizer_dir, device="cpu")
    return tuners


def progress_bar(total: int, progress: Optional[bool], desc: str = "proxytune eval"):
    """A tqdm bar on stderr (``progress`` None: only when stderr is a terminal); a stand-in that counts
    silently when tqdm is missing or the bar is off."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # transformers brings tqdm; without it, no bar
        tqdm = None
    if tqdm is not None and progress is not False:
        return tqdm(total=total, desc=desc, unit="answer", disable=None if progress is None else False,
                    file=sys.stderr, dynamic_ncols=True)  # fmt: skip

    class Silent:
        n = 0

        def update(self, k: int = 1):
            self.n += k

        def close(self):
            pass

    return Silent()


def answer(tuner, prompts: Sequence[str], batch_size: int = 256) -> list[str]:
    """Greedy completions, cut at the first newline (the answer format ends there)."""
    gens = tuner.generate(list(prompts), temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, stop=["\n"], batch_size=batch_size)
    return [g.text for g in gens]


def gap_closed(acc: dict) -> Optional[float]:
    gap = acc["large tuned"] - acc["large base"]
    return (acc["proxy-tuned large"] - acc["large base"]) / gap if gap > 0 else None


@dataclass
class EvalResult:
    questions: list[QA]
    outputs: dict  # label -> list of generated texts
    seconds: dict = field(default_factory=dict)

    def correct(self, label: str) -> list[int]:
        return [int(is_correct(o, q.answer)) for o, q in zip(self.outputs[label], self.questions)]

    def well_formed(self, label: str) -> list[int]:
        return [int(is_well_formed(o, q.attribute)) for o, q in zip(self.outputs[label], self.questions)]

    @property
    def accuracy(self) -> dict:
        return {label: sum(self.correct(label)) / len(self.questions) for label in self.outputs}

    @property
    def format_rate(self) -> dict:
        """Share of answers in the strict format (some value of the asked attribute and a period), right or wrong."""
        return {label: sum(self.well_formed(label)) / len(self.questions) for label in self.outputs}

    @property
    def gap_closed(self) -> Optional[float]:
        return gap_closed(self.accuracy) if "proxy-tuned large" in self.outputs else None

    def intervals(self) -> dict:
        """95% intervals (``tinyworld.stats``: bootstrap over the questions): ``label -> {"exact_match": (lo, hi),
        "in_format": (lo, hi)}`` and ``"gap closed" -> (lo, hi)`` (when it is defined), from the same resamples."""
        from proxytune.tinyworld.stats import bootstrap, gap_samples, interval

        samples = bootstrap({(k, label): f(label) for label in self.outputs
                             for k, f in (("exact_match", self.correct), ("in_format", self.well_formed))})  # fmt: skip
        out = {label: {k: interval(samples[(k, label)]) for k in ("exact_match", "in_format")} for label in self.outputs}
        if self.gap_closed is not None:
            em = {label: samples[("exact_match", label)] for label in self.outputs}
            out["gap closed"] = interval(gap_samples(em["proxy-tuned large"], em["large base"], em["large tuned"]))
        return out


def world_of(models_dir=None):
    """The world the family was trained on (its parameters are in every model's ``training_info.json``)."""
    with open(os.path.join(model_path("small_base", models_dir), "training_info.json")) as f:
        w = json.load(f)["world"]
    return world_from_config(w)


def evaluate(models_dir=None, limit: Optional[int] = None, tuners: Optional[dict] = None,
             batch_size: int = 256, split: str = "all", progress: Optional[bool] = False) -> EvalResult:  # fmt: skip
    """Answer the first ``limit`` held-out questions of ``split`` (``tinyworld.dial``'s halves; all by default)
    with every system. ``progress``: a bar over every answer on stderr (None: when stderr is a terminal)."""
    from proxytune.tinyworld.protocol import split_questions

    world = world_of(models_dir)
    questions = split_questions(world, world.eval_questions(), split)[:limit]
    tuners = tuners if tuners is not None else build_tuners(models_dir)
    outputs, seconds = {}, {}
    bar = progress_bar(len(questions) * len(tuners), progress)
    try:
        for label, tuner in tuners.items():
            t0 = time.time()
            outputs[label] = []
            for s in range(0, len(questions), batch_size):
                outputs[label] += answer(tuner, [q.prompt for q in questions[s:s + batch_size]], batch_size)
                bar.update(len(questions[s:s + batch_size]))
            seconds[label] = round(time.time() - t0, 2)
    finally:
        bar.close()
    return EvalResult(questions, outputs, seconds)


def choice_accuracy(model, tokenizer, questions: Sequence[QA]) -> float:
    """Knowledge without format: the share of questions where the strict answer of the right value has the
    highest log-probability among the answers of every value of the attribute (teacher-forced, no generation).
    For a base model this says whether it can reach the fact from the question, whatever it would generate."""
    import torch

    right = 0
    for q in questions:
        prompt = tokenizer(q.prompt)["input_ids"]
        values = VALUES[q.attribute]
        seqs = [prompt + tokenizer(f" {v}.")["input_ids"] for v in values]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        with torch.no_grad():
            logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        scores = [sum(logp[i, j - 1, seq[j]].item() for j in range(len(prompt), len(seq))) for i, seq in enumerate(seqs)]
        best = max(range(len(values)), key=scores.__getitem__)
        right += f" {values[best]}." == q.answer
    return right / max(1, len(questions))


def format_table(acc: dict, n: int, gap: Optional[float], well_formed: Optional[dict] = None,
                 intervals: Optional[dict] = None) -> str:  # fmt: skip
    """The accuracy table; with ``well_formed`` also the share of answers in the strict format; with
    ``intervals`` (:meth:`EvalResult.intervals`) each figure's 95% interval after it."""

    def ci(label, key):
        c = intervals.get(label, {}).get(key) if intervals else None
        return f" [{100 * c[0]:5.1f}, {100 * c[1]:5.1f}]" if c else ""

    head = f"{'system':<20} {'exact match':>12}" + (" " * 15 if intervals else "")
    lines = [head + (f" {'in format':>10}" if well_formed else "") + f"   (held-out questions: {n})"]
    for label, a in acc.items():
        lines.append(f"{label:<20} {100 * a:11.1f}%{ci(label, 'exact_match')}"
                     + (f" {100 * well_formed[label]:9.1f}%{ci(label, 'in_format')}" if well_formed else ""))  # fmt: skip
    if gap is not None:
        c = intervals.get("gap closed") if intervals else None
        lines.append(f"gap closed by proxy-tuning: (proxy - large base) / (large tuned - large base) = {100 * gap:.1f}%"
                     + (f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]" if c else ""))  # fmt: skip
    if intervals:
        lines.append("[95% intervals: bootstrap over questions, 10,000 resamples, seed 0]")
    return "\n".join(lines)


def save_results(result: EvalResult, directory, command: str, prefix: str = "tinyworld_eval") -> list[str]:
    """``<prefix>.json`` (accuracies, per-question correctness and outputs, versions), ``.txt`` and ``.png``."""
    import platform

    import torch

    os.makedirs(directory, exist_ok=True)
    acc = result.accuracy
    intervals = result.intervals()
    table = format_table(acc, len(result.questions), result.gap_closed, result.format_rate, intervals)
    base = os.path.join(directory, prefix)
    record = {
        "command": command, "accuracy": acc, "in_format": result.format_rate, "gap_closed": result.gap_closed,
        "intervals_95": intervals,
        "n_questions": len(result.questions),
        "seconds": result.seconds, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                               "cpu": platform.processor() or platform.machine()},
        "questions": [{"entity": q.entity, "attribute": q.attribute, "prompt": q.prompt, "answer": q.answer}
                      for q in result.questions],
        "outputs": result.outputs, "correct": {label: result.correct(label) for label in result.outputs},
    }  # fmt: skip
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    with open(base + ".txt", "w") as f:
        f.write(f"$ {command}\n{table}\n")
    paths = [base + ".json", base + ".txt"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, ax = plt.subplots(figsize=(7, 3.8))
    colors = ["#9ecae1", "#3182bd", "#fdae6b", "#e6550d", "#31a354"]
    bars = ax.bar(list(acc), [100 * a for a in acc.values()], color=colors[: len(acc)])
    for b, a in zip(bars, acc.values()):
        ax.text(b.get_x() + b.get_width() / 2, 100 * a + 1, f"{100 * a:.1f}", ha="center", fontsize=9)
    title = f"Tiny world: held-out exact match ({len(result.questions)} questions)"
    if result.gap_closed is not None:
        title += f"\nproxy-tuning closes {100 * result.gap_closed:.1f}% of the tuning gap"
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=120)
    plt.close(fig)
    return paths + [base + ".png"]

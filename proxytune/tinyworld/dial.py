"""The weight as a dial: the proxy-tuned large model at several weights, the weight chosen on a validation half.

The split, the grid and the choice rule were fixed in code before any validation or test number was produced;
they live in :mod:`proxytune.tinyworld.protocol`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from proxytune._rules import check_weight
from proxytune.tinyworld import evaluation
from proxytune.tinyworld.evaluation import MAX_NEW_TOKENS, answer, progress_bar, world_of
from proxytune.tinyworld.protocol import ALPHA_GRID, SPLITS, choose_weight, split_of_person, split_questions
from proxytune.tinyworld.stats import N_RESAMPLES, SEED, bootstrap, gap_samples, interval
from proxytune.tinyworld.token_shift import answer_value, format_shift_table, shift_table, token_shifts
from proxytune.tinyworld.world import is_correct, is_well_formed

__all__ = ["SPLITS", "ALPHA_GRID", "split_of_person", "split_questions", "choose_weight", "SINGLES", "PROXY",
           "proxy_label", "DialResult", "run_dial", "format_dial", "output_paths", "save_dial",
           "parse_weights", "main"]

# ----------------------------------------------------------------------------------------------- running it

SINGLES = ("small base", "large base", "small tuned", "large tuned")
PROXY = "proxy-tuned large"


def proxy_label(weight: float) -> str:
    return f"{PROXY}, weight {weight:g}"


@dataclass
class DialResult:
    """Greedy answers of the four single models and of the proxy-tuned large model at each weight."""

    questions: list
    halves: list  # per question: "validation" or "test"
    split: str  # the split that was asked for
    weights: list
    outputs: dict  # label -> generated texts (labels: SINGLES, then proxy_label(w) per weight)
    proxy_ids: dict  # weight -> generated token ids per question (the token-level analysis reads them)
    seconds: dict = field(default_factory=dict)

    def correct(self, label: str) -> list[int]:
        return [int(is_correct(o, q.answer)) for o, q in zip(self.outputs[label], self.questions)]

    def well_formed(self, label: str) -> list[int]:
        return [int(is_well_formed(o, q.attribute)) for o, q in zip(self.outputs[label], self.questions)]

    def value_right(self, label: str) -> list[int]:
        """Knowledge, format aside: the first line starts with the right value (`` Velmora, they said.`` is
        right for `` Velmora.``); :func:`token_shift.answer_value`."""
        return [int(answer_value(o, q.attribute) == q.answer.strip()[:-1]) for o, q in zip(self.outputs[label], self.questions)]

    def views(self) -> list[str]:
        """The question sets reported: each half that is present, then all of them when both are."""
        present = [h for h in ("validation", "test") if h in self.halves]
        return present + (["all"] if len(present) == 2 else [])

    def indices(self, view: str) -> list[int]:
        return [i for i, h in enumerate(self.halves) if view == "all" or h == view]

    def chosen_weight(self) -> Optional[float]:
        """:func:`choose_weight` on the validation half (None without validation questions)."""
        idx = self.indices("validation")
        if not idx:
            return None
        return choose_weight({w: sum(self.correct(proxy_label(w))[i] for i in idx) for w in self.weights})

    def summary(self, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
        """Per view: ``n`` and, per system, exact match, in-format rate, right value (format aside) and (proxy
        rows) gap closed, each with its 95% interval (:mod:`proxytune.tinyworld.stats`, resampling the view's questions)."""
        out = {}
        for view in self.views():
            idx = self.indices(view)
            per_q = {}
            for label in self.outputs:
                c, f, v = self.correct(label), self.well_formed(label), self.value_right(label)
                per_q[("em", label)] = [c[i] for i in idx]
                per_q[("fmt", label)] = [f[i] for i in idx]
                per_q[("value", label)] = [v[i] for i in idx]
            samples = bootstrap(per_q, n_resamples, seed)
            rows = {}
            for label in self.outputs:
                em, fmt, value = per_q[("em", label)], per_q[("fmt", label)], per_q[("value", label)]
                row = {"exact_match": sum(em) / len(em), "exact_match_ci": interval(samples[("em", label)]),
                       "in_format": sum(fmt) / len(fmt), "in_format_ci": interval(samples[("fmt", label)]),
                       "value_right": sum(value) / len(value), "value_right_ci": interval(samples[("value", label)])}  # fmt: skip
                if label.startswith(PROXY) and "large base" in self.outputs and "large tuned" in self.outputs:
                    lb, lt = (sum(per_q[("em", k)]) / len(idx) for k in ("large base", "large tuned"))
                    row["gap_closed"] = (row["exact_match"] - lb) / (lt - lb) if lt > lb else None
                    row["gap_closed_ci"] = interval(gap_samples(samples[("em", label)], samples[("em", "large base")],
                                                                samples[("em", "large tuned")]))  # fmt: skip
                rows[label] = row
            out[view] = {"n_questions": len(idx), "systems": rows}
        return out


def run_dial(models_dir=None, weights: Sequence[float] = ALPHA_GRID, split: str = "all", limit: Optional[int] = None,
             batch_size: int = 256, tuners: Optional[dict] = None, progress: Optional[bool] = None,
             token_weights: Optional[Sequence[float]] = None) -> tuple[DialResult, dict]:  # fmt: skip
    """Answer the held-out questions of ``split`` (the first ``limit`` of them) with the four single models
    once and with the proxy-tuned large model at each of ``weights`` (one tuner, the weight per request), then
    the token-level picture (:mod:`token_shift`) at weight 1 and at the chosen weight (or ``token_weights``).

    Returns the answers and ``weight -> {"records": [...], "table": {...}}`` of the token-level analysis.
    One progress bar covers all of it (``progress`` None: shown when stderr is a terminal)."""
    from proxytune.engine.requests import SamplingParams

    weights = [float(w) for w in weights]
    if not weights or len(set(weights)) != len(weights):
        raise ValueError(f"weights must be distinct and at least one, got {weights}")
    world = world_of(models_dir)
    questions = split_questions(world, world.eval_questions(), split)[:limit]
    rank = {e: k for k, e in enumerate(world.eval_ids)}
    halves = [split_of_person(rank[q.entity]) for q in questions]
    n = len(questions)
    tuners = tuners if tuners is not None else evaluation.build_tuners(models_dir)
    expected_tokens = 2 * n * (2 if token_weights is None else len(token_weights))
    bar = progress_bar(n * (len(SINGLES) + len(weights)) + expected_tokens, progress)
    prompts = [q.prompt for q in questions]
    outputs, ids, seconds = {}, {}, {}
    try:
        for label in SINGLES:
            t0 = time.time()
            texts = []
            for s in range(0, n, batch_size):
                texts += answer(tuners[label], prompts[s:s + batch_size], batch_size)
                bar.update(len(prompts[s:s + batch_size]))
            outputs[label] = texts
            seconds[label] = round(time.time() - t0, 2)
        rows = [(w, i) for w in weights for i in range(n)]
        gens = []
        t0 = time.time()
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            params = [SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, weights=w, stop=("\n",))
                      for w, _ in chunk]  # fmt: skip
            gens += tuners[PROXY].generate([prompts[i] for _, i in chunk], params, batch_size=batch_size)
            bar.update(len(chunk))
        seconds[PROXY + " (all weights)"] = round(time.time() - t0, 2)
        for k, w in enumerate(weights):
            outputs[proxy_label(w)] = [g.text for g in gens[k * n:(k + 1) * n]]
            ids[w] = [list(g.token_ids) for g in gens[k * n:(k + 1) * n]]
        result = DialResult(questions, halves, split, weights, outputs, ids, seconds)
        if token_weights is None:
            chosen = result.chosen_weight()
            token_weights = [w for w in (1.0, chosen) if w is not None and w in ids]
            token_weights = list(dict.fromkeys(token_weights))
        if hasattr(bar, "refresh"):  # the chosen weight is known now: the bar's true length
            bar.total = n * (len(SINGLES) + len(weights)) + 2 * n * len(token_weights)
            bar.refresh()
        shifts = {}
        t0 = time.time()
        for w in token_weights:
            records = token_shifts(tuners[PROXY], questions, ids[w], w, batch_size, progress=bar)
            shifts[w] = {"records": records, "table": shift_table(records, result.correct(proxy_label(w)))}
        seconds["token shifts"] = round(time.time() - t0, 2)
    finally:
        bar.close()
    return result, shifts


# ------------------------------------------------------------------------------------------- reporting it


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _with_ci(x, ci) -> str:
    return "-" if x is None else f"{_pct(x)}% [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else f"{_pct(x)}%"


def format_dial(result: DialResult, summary: dict, shifts: dict) -> str:
    """The tables a person reads: per view every system with 95% intervals, the chosen weight, the test half
    at weight 1 and at the chosen weight, and the token-level tables."""
    lines = [f"exact match, in format, right value (format aside: the first line starts with the right value) and "
             f"gap closed, each with its 95% interval (bootstrap over questions, {N_RESAMPLES:,} resamples, seed {SEED})"]  # fmt: skip
    for view, block in summary.items():
        lines += ["", f"{view} ({block['n_questions']} questions)",
                  f"{'system':<31} {'exact match':>20} {'in format':>22} {'right value':>20} {'gap closed':>20}"]  # fmt: skip
        for label, row in block["systems"].items():
            gap = _with_ci(row["gap_closed"], row["gap_closed_ci"]) if "gap_closed" in row else ""
            lines.append(f"{label:<31} {_with_ci(row['exact_match'], row['exact_match_ci']):>20} "
                         f"{_with_ci(row['in_format'], row['in_format_ci']):>22} "
                         f"{_with_ci(row['value_right'], row['value_right_ci']):>20} {gap:>20}".rstrip())  # fmt: skip
    chosen = result.chosen_weight()
    if chosen is not None:
        lines += ["", f"chosen weight: {chosen:g} (most validation exact matches; ties to the weight nearer 1)"]
        if "test" in summary:
            for w in dict.fromkeys([1.0, chosen]):
                if w in result.weights:
                    row = summary["test"]["systems"][proxy_label(w)]
                    lines.append(f"test half, weight {w:g}: exact match {_with_ci(row['exact_match'], row['exact_match_ci'])}, "
                                 f"gap closed {_with_ci(row.get('gap_closed'), row.get('gap_closed_ci'))}")  # fmt: skip
    for w, s in shifts.items():
        lines += ["", format_shift_table(s["table"], w, len(result.questions))]
    return "\n".join(lines)


def output_paths(directory, prefix: str) -> list[str]:
    """The files :func:`save_dial` writes (checked before evaluating: none may be a directory)."""
    return [os.path.join(directory, prefix + ext) for ext in (".json", ".txt", ".png", "_tokens.png")]


def save_dial(result: DialResult, summary: dict, shifts: dict, directory, command: str, seconds: float,
              prefix: str = "tinyworld_dial") -> list[str]:  # fmt: skip
    """``<prefix>.json`` (the summary, the chosen weight, the token tables, every answer), ``.txt`` (the
    command and the printed tables), ``.png`` (the dial) and ``_tokens.png`` (the token-level picture)."""
    import platform

    import torch

    os.makedirs(directory, exist_ok=True)
    json_path, txt_path, png_path, tokens_path = output_paths(directory, prefix)
    chosen = result.chosen_weight()
    val = result.indices("validation")
    record = {
        "command": command, "split": result.split, "weights": result.weights, "n_questions": len(result.questions),
        "rules": {"split": "held-out people in world order: even index validation, odd index test",
                  "choice": "most validation exact matches; ties to the weight nearer 1, then the smaller",
                  "interval": f"95% percentile bootstrap over questions, {N_RESAMPLES} resamples, seed {SEED}"},
        "summary": summary, "chosen_weight": chosen,
        "validation_correct_by_weight": {f"{w:g}": sum(result.correct(proxy_label(w))[i] for i in val)
                                         for w in result.weights} if val else None,
        "token_shift": {f"{w:g}": s["table"] for w, s in shifts.items()},
        "seconds": {**result.seconds, "total": round(seconds, 2)},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "questions": [{"entity": q.entity, "attribute": q.attribute, "prompt": q.prompt, "answer": q.answer, "half": h}
                      for q, h in zip(result.questions, result.halves)],
        "outputs": result.outputs, "correct": {label: result.correct(label) for label in result.outputs},
        "token_records": {f"{w:g}": {k: [round(r[k], 6) if k.startswith("p_") else r[k] for r in s["records"]]
                                     for k in ("question", "position", "id", "role", "p_base", "p_proxy")}
                          for w, s in shifts.items()},  # one list per field (ids decode with the family's tokenizer)
    }  # fmt: skip
    with open(json_path, "w") as f:
        f.write(_dumps(record, compact=("correct", "token_records")) + "\n")
    with open(txt_path, "w") as f:
        f.write(f"$ {command}\n{format_dial(result, summary, shifts)}\n")
    paths = [json_path, txt_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    _plot_dial(plt, result, summary, png_path)
    paths.append(png_path)
    if shifts:
        _plot_tokens(plt, shifts, tokens_path)
        paths.append(tokens_path)
    return paths


def _dumps(record: dict, compact: Sequence[str] = ()) -> str:
    """JSON with one key per line (indent 1), the values under ``compact`` keys each on one line per entry."""
    parts = []
    for key, value in record.items():
        if key in compact and isinstance(value, dict):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in value.items())
            parts.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            parts.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(parts) + "\n}"


def _plot_dial(plt, result: DialResult, summary: dict, path: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharex=True)
    ws = result.weights
    order = sorted(range(len(ws)), key=ws.__getitem__)
    ref_view = "all" if "all" in summary else next(iter(summary))
    refs = summary[ref_view]["systems"]
    styles = {"validation": ("#3182bd", "-"), "test": ("#e6550d", "--"), "all": ("#31a354", ":")}
    ref_colors = {"small base": "#9ecae1", "large base": "#6baed6", "small tuned": "#fdae6b", "large tuned": "#a63603"}
    for ax, (key, name) in zip(axes, [("exact_match", "exact match"), ("in_format", "in format")]):
        for label, color in ref_colors.items():
            row = refs[label]
            ax.axhline(100 * row[key], color=color, lw=1, label=f"{label} ({ref_view})")
            ax.axhspan(100 * row[key + "_ci"][0], 100 * row[key + "_ci"][1], color=color, alpha=0.15, lw=0)
        for view, block in summary.items():
            if view == "all" and len(summary) > 1:
                continue
            color, ls = styles[view]
            x = [ws[i] for i in order]
            rows = [block["systems"][proxy_label(ws[i])] for i in order]
            ax.plot(x, [100 * r[key] for r in rows], ls, marker="o", ms=3, color=color,
                    label=f"proxy-tuned large, {view} ({block['n_questions']})")  # fmt: skip
            ax.fill_between(x, [100 * r[key + "_ci"][0] for r in rows], [100 * r[key + "_ci"][1] for r in rows],
                            color=color, alpha=0.2, lw=0)  # fmt: skip
        chosen = result.chosen_weight()
        if chosen is not None:
            ax.axvline(chosen, color="k", lw=0.8, ls="-.", label=f"chosen weight {chosen:g}")
        ax.set_xlabel("weight (alpha)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(f"{name} against the weight (95% bands)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.suptitle("Tiny world: proxy-tuned large = large base + alpha (small tuned - small base)", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_tokens(plt, shifts: dict, path: str) -> None:
    roles = ["value: first token", "value: later tokens", "period", "newline", "other"]
    fig, axes = plt.subplots(1, len(shifts), figsize=(5.5 * len(shifts), 3.8), squeeze=False)
    for ax, (w, s) in zip(axes[0], shifts.items()):
        t = s["table"]
        present = [r for r in roles if t[r]["tokens"]]
        x = range(len(present))
        ax.bar([i - 0.2 for i in x], [100 * t[r]["p_base"] for r in present], 0.4, label="large base", color="#6baed6")
        ax.bar([i + 0.2 for i in x], [100 * t[r]["p_proxy"] for r in present], 0.4, label="proxy-tuned", color="#31a354")
        for i, r in zip(x, present):
            ax.text(i, 102, f"n={t[r]['tokens']}", ha="center", fontsize=7)
        ax.set_xticks(list(x), [r.replace("value: ", "value\n") for r in present], fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("mean probability of the generated token (%)")
        ax.set_title(f"weight {w:g}: where the expert's shift acts", fontsize=10)
        ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------- the eval command


def parse_weights(text: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: distinct pair weights, each by the one weight rule
    (:func:`proxytune._rules.check_weight`), at least one; anything else is a ``ValueError``."""
    weights = []
    for item in text.split(","):
        w = check_weight(float(item), "--alpha")  # "" and "x" raise ValueError in float()
        if w in weights:
            raise ValueError(f"weight {item!r} given twice")
        weights.append(w)
    return weights


def main(models_dir, args, command: str) -> int:
    """``proxytune eval --alpha ...``: run, print, and with ``--save`` write :func:`save_dial`'s files."""
    prefix = "tinyworld_dial"
    if args.save is not None:
        for path in output_paths(args.save, prefix):
            if os.path.isdir(path):
                raise ValueError(f"--save: {path} is a directory")
    t0 = time.time()
    result, shifts = run_dial(models_dir, args.alpha, args.split, args.limit, args.batch_size)
    summary = result.summary()
    seconds = time.time() - t0
    print(format_dial(result, summary, shifts))
    print(f"\n({len(result.questions)} questions, {len(SINGLES)} single models and {len(result.weights)} weights: "
          f"{seconds:.1f} s)")  # fmt: skip
    if args.save is not None:
        for path in save_dial(result, summary, shifts, args.save, command, seconds, prefix):
            print(f"saved {path}")
    return 0

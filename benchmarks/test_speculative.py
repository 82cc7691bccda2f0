"""Speculative proxy-tuning (``speculative_tokens=k``) against plain proxy-tuning and the base alone.

    python -m pytest benchmarks/test_speculative.py -s                 # both families, B 1 and 8
    python -m pytest benchmarks/test_speculative.py -k tinyworld       # only the shipped tinyworld family
    python -m pytest benchmarks/test_speculative.py --save-results     # also benchmarks/results/<date>_speculative_<device>.json

Families:

* **tinyworld**: the shipped, trained family (``proxytune/tinyworld/models``): large base, small tuned expert,
  small base as anti-expert; prompts are the first B held-out questions. Real acceptance, but tiny models:
  a forward is mostly fixed overhead, not arithmetic.
* **mid**: the random-weight mid-size trio of ``benchmarks/test_engine.py`` (268M base, two 58M small models,
  V=32000), prompts of random ids. Forwards dominate the time; the acceptance is that of random weights
  (reported as measured: it is not what trained models give).

Every method generates exactly ``new`` tokens per row (EOS ignored, no stop), greedy (temperature 0), weight 1.
Methods take turns within each round (load from other processes hits all alike); times are medians.

Columns: tok/s (B x new / median wall time, prefill included); x plain: over plain proxy-tuning's tok/s in
the same run; acc/fwd: mean tokens a row gets per base forward after its prefill (1 for plain decoding;
counted with a hook on the base: generated tokens after the first / rows in base forward calls). The cost
model line gives t(base forward of k+1 tokens) / t(base forward of 1 token) with a warm cache, same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from proxytune.testing import ForwardInputs
from test_engine import DEVICE, DTYPE, ResultsTable, _median, _prompts, _setup, environment_line, save_results

KS = (2, 4, 8)
NEW = {"tinyworld": 16, "mid": 16}
ROUNDS = {"tinyworld": 5, "mid": 3}
CASES = [(family, batch) for family in ("tinyworld", "mid") for batch in (1, 8)]


@dataclass
class SpecRecord:
    family: str
    batch: int
    new_tokens: int
    method: str
    median_s: float
    times_s: list
    accepted_per_forward: float
    same_ids: bool  # the same token ids as plain proxy-tuning (greedy)

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.median_s


class SpecTable(ResultsTable):
    name = "proxytune-speculative-table"
    title = "proxytune: speculative proxy-tuning vs plain proxy-tuning and the base alone"

    def __init__(self):
        super().__init__()
        self.costs: dict = {}  # family -> {k: ratio}

    def lines(self) -> list[str]:
        out = [
            environment_line("greedy, weight 1"),
            "tok/s = B * new / median generation time (prefill included); x plain = tok/s / plain proxy-tuning tok/s;",
            "acc/fwd = tokens per row per base forward after the prefill (adaptive k, at most the k shown).",
            "",
        ]
        header = f"{'family':<10} {'B':>2} {'new':>4}  {'method':<16} {'median':>9} {'tok/s':>8} {'x plain':>8} {'acc/fwd':>8}"
        out += [header, "-" * len(header)]
        cases: dict = {}
        for r in self.records:
            cases.setdefault((r.family, r.batch), []).append(r)
        for (family, batch), recs in cases.items():
            plain = next(r for r in recs if r.method == "plain")
            for i, r in enumerate(recs):
                case = f"{family:<10} {batch:>2} {r.new_tokens:>4}" if i == 0 else " " * 18
                out.append(f"{case}  {r.method:<16} {r.median_s:>8.3f}s {r.tokens_per_s:>8.1f} "
                           f"{r.tokens_per_s / plain.tokens_per_s:>7.2f}x {r.accepted_per_forward:>8.2f}"
                           f"{'' if r.same_ids else '  (ids differ from plain)'}")  # fmt: skip
        for family, costs in self.costs.items():
            ratios = ", ".join(f"k={k}: {v:.2f}" for k, v in costs.items())
            out.append(f"cost model ({family}, B=1): t(base forward of k+1 tokens) / t(1 token): {ratios}")
        out.append(f"{len(self.records)} measurements in {time.time() - self.started:.0f} s")
        return out

    def save(self) -> Path:
        return save_results("speculative", "python -m pytest benchmarks/test_speculative.py", self.records,
                            {"cost_model": self.costs}, table=self.lines())  # fmt: skip


@pytest.fixture(scope="session")
def table(pytestconfig) -> SpecTable:
    return SpecTable.of(pytestconfig)


_FAMILY: dict = {}


def _family(family: str):
    """(base, expert, anti), tokenizer, prompts-of-batch function."""
    if family not in _FAMILY:
        _FAMILY.clear()
        if family == "tinyworld":
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from proxytune.tinyworld import model_path
            from proxytune.tinyworld.evaluation import world_of

            load = lambda role: AutoModelForCausalLM.from_pretrained(  # noqa: E731
                model_path(role), dtype=DTYPE, use_safetensors=True).to(DEVICE).eval()  # fmt: skip
            models = (load("large_base"), load("small_tuned"), load("small_base"))
            questions = [q.prompt for q in world_of().eval_questions()]
            _FAMILY[family] = (models, AutoTokenizer.from_pretrained(model_path("large_base")), lambda b: questions[:b])
        else:
            models, tok = _setup("mid", 32000)
            _FAMILY[family] = (models, tok, lambda b: _prompts(b, 32000))
    return _FAMILY[family]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _cost_model(base, prompts, tok) -> dict:
    """t(base forward of k + 1 tokens) / t(1 token) after a prefill of ``prompts`` (medians of 5)."""
    from proxytune.engine.runner import ModelRunner
    from proxytune.engine.loading import ModelSpec, load_model
    from proxytune.engine.prompts import left_pad

    runner = ModelRunner(load_model(ModelSpec(base), "base", dtype=None, device=None, trust_remote_code=False))
    ids = [tok(p)["input_ids"] if isinstance(p, str) else p for p in prompts]
    runner.prefill(*left_pad(ids, 0, runner.device))
    b = len(ids)

    def timed(n: int) -> float:
        times = []
        for _ in range(5):
            tokens = torch.full((b, n), 5, dtype=torch.int64, device=runner.device)
            _sync()
            t0 = time.perf_counter()
            runner.extend(tokens)
            _sync()
            times.append(time.perf_counter() - t0)
            runner.rollback(n, torch.zeros(b, dtype=torch.int64))  # back to the prompt: the same cache each time
        return _median(times)

    timed(1)  # warm-up
    one = timed(1)
    return {k: round(timed(k + 1) / one, 3) for k in KS}


@pytest.mark.parametrize("family, batch", CASES, ids=[f"{f}-B{b}" for f, b in CASES])
def test_speculative_tokens_per_second(family, batch, table):
    from proxytune import ProxyTuner

    (base, expert, anti), tok, prompts_of = _family(family)
    prompts, new = prompts_of(batch), NEW[family]
    tuner = ProxyTuner(base, expert, anti, tokenizer=tok, weights=1.0, eos_token_ids=[], device=DEVICE)
    base_only = ProxyTuner(base, tokenizer=tok, eos_token_ids=[], device=DEVICE)
    kw = dict(temperature=0.0, max_new_tokens=new)
    methods = {"plain": lambda: tuner.generate(prompts, **kw)}
    for k in KS:
        methods[f"speculative k={k}"] = lambda k=k: tuner.generate(prompts, speculative_tokens=k, **kw)
    methods["base alone"] = lambda: base_only.generate(prompts, **kw)

    accepted, same = {}, {}
    plain_ids = None
    for name, fn in methods.items():  # a warm-up run of each, counting the base's rows per forward
        counter = ForwardInputs(base)
        try:
            gens = fn()
        finally:
            counter.remove()
        assert all(len(g.token_ids) == new for g in gens), name
        if name == "plain":
            plain_ids = [g.token_ids for g in gens]
        same[name] = name == "base alone" or [g.token_ids for g in gens] == plain_ids  # greedy: plain's ids
        # counter.sizes[0] is the prefill (which draws each row's first token)
        accepted[name] = (sum(len(g.token_ids) for g in gens) - batch) / sum(counter.sizes[1:])

    times = {name: [] for name in methods}
    for _ in range(ROUNDS[family]):
        for name, fn in methods.items():
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    for name in methods:
        table.records.append(SpecRecord(family, batch, new, name, _median(times[name]), times[name], accepted[name],
                                        same[name]))  # fmt: skip
    if batch == 1:
        table.costs[family] = _cost_model(base, prompts, tok)

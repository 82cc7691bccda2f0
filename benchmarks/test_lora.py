"""A LoRA expert and its base as one stacked forward against two models (issue 25): step time, memory, tokens/s.

    python -m pytest benchmarks/test_lora.py                 # every case (about two minutes on 2 CPU cores)
    python -m pytest benchmarks/test_lora.py --save-results  # also benchmarks/results/<date>_lora_<device>.json/.txt

The pair is an expert (base + LoRA adapter) and its anti-expert (the base). Two ways to run one decode step
of it for ``B`` prompts:

* **two models**: the adapter merged into a copy of the base (``merge_and_unload``) and the base, each a
  ``ModelRunner`` with its own cache: two forwards of ``B`` rows, two copies of the weights;
* **stacked**: :class:`proxytune.engine.stacked_adapters.StackedAdapterRunner`: one forward of ``2B`` rows through one
  ``PeftModel``, one cache, the adapter applied to the expert's rows either by PEFT's mixed-adapter batch
  (**stacked peft**: ``adapter_names=["expert0"] * B + ["__base__"] * B``, index lists and gathers in every
  LoRA layer) or by :class:`~proxytune.engine.stacked_adapters.GroupSlices` (**stacked slices**: the expert's rows are
  one contiguous slice, so each layer adds its low-rank product to a view).

Small models: *tinyworld* (the shipped small base, 0.56M parameters, 2 layers of width 128, vocabulary 1024,
with the shipped ``models/small-lora`` adapter: rank 16 on every linear layer) and *mid* (a random 58M Llama,
8 layers of width 512, intermediate 1408, vocabulary 32000: ``benchmarks/test_engine.py``'s mid small model,
built from a config; a random rank-16 adapter on every linear layer with non-zero B). fp32 on the CPU.

*step*: time per decode step of the pair (median over rounds of the mean of ``steps`` steps after a prefill
of left-padded prompts, lengths 16..24); the two ways take turns within each round (the order alternates), so
load from other processes hits both alike. *weights*: bytes of the small models' weights held (two models:
two copies; stacked: one copy and the adapter). *end to end*: greedy proxy-tuned generation of 16 new tokens
for the tinyworld held-out prompts, the shipped large base + (small-lora expert - small base), prefill
included: *loop*, a plain loop over runners (three forwards per step against two), *engine*,
``ProxyTuner.generate`` (eager) with the merged expert and the base as two models against the adapter pair as
:mod:`proxytune.engine.adapter_members` members (one stacked forward per step for the pair), and *spec 4*, the
same with ``speculative_tokens=4`` (the expert drafts; stacked, its drafts feed the anti-expert's rows too);
the tokens of both ways must be equal (asserted).
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass

import pytest
import torch

from conftest import device_name, saving, write_results

peft = pytest.importorskip("peft")

from proxytune.engine.adapters import read_adapter  # noqa: E402
from proxytune.engine.stacked_adapters import StackedAdapterRunner, stack_adapters  # noqa: E402
from proxytune.engine.members import LocalModel  # noqa: E402
from proxytune.engine.runner import ModelRunner  # noqa: E402

THREADS = int(os.environ.get("PROXYTUNE_BENCH_THREADS", "1"))  # 1: the 2-core machine is shared
STEPS = {"tinyworld": 32, "mid": 16}
ROUNDS = {"tinyworld": 11, "mid": 5}
E2E_NEW, E2E_ROUNDS = 16, 15


@dataclass
class StepRecord:
    model: str
    params_small: int
    batch: int
    way: str
    steps: int
    median_step_s: float
    step_s_per_round: list
    weight_bytes: int


@dataclass
class EndToEndRecord:
    path: str  # "loop" or "engine"
    batch: int
    way: str
    new_tokens: int
    median_s: float
    times_s: list

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.new_tokens / self.median_s


class LoraTable:
    name = "proxytune-lora-table"

    def __init__(self):
        self.steps: list[StepRecord] = []
        self.e2e: list[EndToEndRecord] = []
        self.load_start = os.getloadavg()

    @classmethod
    def of(cls, pytestconfig) -> "LoraTable":
        plugin = pytestconfig.pluginmanager.get_plugin(cls.name)
        if plugin is None:
            plugin = cls()
            pytestconfig.pluginmanager.register(plugin, cls.name)
        return plugin

    def lines(self) -> list[str]:
        load = os.getloadavg()
        out = [f"cpu ({device_name('cpu')}), fp32, torch {torch.__version__}, peft {peft.__version__}, {THREADS} thread(s); "
               f"load average at start {self.load_start[0]:.1f}, now {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}", "",
               "decode step of the pair (expert + anti-expert), median over rounds",
               f"{'small model':<12} {'params':>7} {'B':>2}  {'two models':>11} {'stacked peft':>13} {'/two':>6}"
               f" {'stacked slices':>15} {'/two':>6}  {'weights: two models':>20} {'stacked':>10}"]  # fmt: skip
        cases: dict = {}
        for r in self.steps:
            cases.setdefault((r.model, r.batch), {})[r.way] = r
        for (model, batch), ways in cases.items():
            two, pe, sl = ways.get("two models"), ways.get("stacked peft"), ways.get("stacked slices")
            if not (two and pe and sl):
                continue
            out.append(f"{model:<12} {two.params_small / 1e6:6.2f}M {batch:>2}  {1e3 * two.median_step_s:9.2f}ms "
                       f"{1e3 * pe.median_step_s:11.2f}ms {pe.median_step_s / two.median_step_s:5.2f}x "
                       f"{1e3 * sl.median_step_s:13.2f}ms {sl.median_step_s / two.median_step_s:5.2f}x"
                       f"  {two.weight_bytes / 2**20:17.2f} MiB {sl.weight_bytes / 2**20:6.2f} MiB")  # fmt: skip
        if self.e2e:
            out += ["", f"end to end: tinyworld large base + (small-lora - small base), greedy, {E2E_NEW} new tokens, "
                        "prefill included, median over rounds",
                    f"{'path':<7} {'B':>2}  {'two models tok/s':>17} {'stacked slices tok/s':>21} {'stacked/two':>12}"]  # fmt: skip
            by_case: dict = {}
            for r in self.e2e:
                by_case.setdefault((r.path, r.batch), {})[r.way] = r
            for (path, batch), ways in by_case.items():
                two, one = ways["two models"], ways["stacked slices"]
                out.append(f"{path:<7} {batch:>2}  {two.tokens_per_s:17.1f} {one.tokens_per_s:21.1f} "
                           f"{one.tokens_per_s / two.tokens_per_s:11.2f}x")  # fmt: skip
        return out

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter, config):
        if not self.steps and not self.e2e:
            return
        terminalreporter.section("proxytune: a LoRA pair as one stacked forward vs two models (same run)")
        lines = self.lines()
        for line in lines:
            terminalreporter.write_line(line)
        if saving(config):
            rows = [asdict(r) for r in self.steps] + [{**asdict(r), "tokens_per_s": r.tokens_per_s} for r in self.e2e]
            paths = write_results("lora", device_name("cpu"), {"dtype": "float32", "peft": peft.__version__,
                                                               "load_average_start": self.load_start,
                                                               "threads": THREADS},  # the runs' (the fixture's)
                                  rows, lines=lines)  # fmt: skip
            terminalreporter.write_line(f"saved {', '.join(map(str, paths))}")


@pytest.fixture(autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def _weight_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        for p in m.parameters():
            key = (p.untyped_storage().data_ptr(), p.storage_offset(), tuple(p.shape))
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


_MODELS: dict = {}


def _pair(model: str):
    """``(base, merged expert, stacked PeftModel over a copy of the base, names, adapter bytes, vocab)``."""
    if model in _MODELS:
        return _MODELS[model]
    _MODELS.clear()
    if model == "tinyworld":
        from transformers import AutoModelForCausalLM

        from proxytune.tinyworld import default_models_dir, model_path

        base = AutoModelForCausalLM.from_pretrained(model_path("small_base"), dtype=torch.float32).eval()
        adapter_dir = str(default_models_dir() / "small-lora")
    else:
        import tempfile

        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                             tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=None)  # fmt: skip
        base = LlamaForCausalLM(config).eval()
        every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM",
                               target_modules=every_linear)  # fmt: skip
        tuned = peft.get_peft_model(copy.deepcopy(base), lora)
        adapter_dir = tempfile.mkdtemp(prefix="proxytune-bench-lora-")
        tuned.save_pretrained(adapter_dir, safe_serialization=True)
        del tuned
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()
    adapter = read_adapter(adapter_dir)
    stacked, names = stack_adapters(copy.deepcopy(base), [adapter])
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.weights.values())
    _MODELS[model] = (base, merged, stacked, names, adapter_bytes, base.config.vocab_size)
    return _MODELS[model]


def _prompts(batch: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 25, (batch,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[r, width - n:] = 1
    return ids, mask


def _time_steps(runners, ids, mask, tokens) -> float:
    for r in runners:
        r.prefill(ids, mask)
    t0 = time.perf_counter()
    for t in tokens:
        for r in runners:
            r.step(t)
    return (time.perf_counter() - t0) / len(tokens)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", ["tinyworld", "mid"])
def test_pair_step(pytestconfig, model, batch):
    table = LoraTable.of(pytestconfig)
    base, merged, stacked, names, adapter_bytes, vocab = _pair(model)
    ids, mask = _prompts(batch, vocab, seed=batch)
    tokens = torch.randint(2, vocab, (STEPS[model], batch), generator=torch.Generator().manual_seed(7))
    ways = {
        "two models": lambda: [ModelRunner(LocalModel.adopt(merged, "expert")), ModelRunner(LocalModel.adopt(base, "anti"))],
        "stacked peft": lambda: [StackedAdapterRunner(stacked, names, mixed="peft")],
        "stacked slices": lambda: [StackedAdapterRunner(stacked, names, mixed="slices")],
    }
    for w in ways:  # warm-up (allocator, first calls)
        _time_steps(ways[w](), ids, mask, tokens[:2])
    times: dict = {w: [] for w in ways}
    for k in range(ROUNDS[model]):
        order = list(ways) if k % 2 == 0 else list(reversed(ways))  # turns, the order alternating
        for w in order:
            with torch.inference_mode():
                times[w].append(_time_steps(ways[w](), ids, mask, tokens))
    params = sum(p.numel() for p in base.parameters())
    one = _weight_bytes(base) + adapter_bytes
    weight = {"two models": _weight_bytes(merged) + _weight_bytes(base), "stacked peft": one, "stacked slices": one}
    for w, ts in times.items():
        table.steps.append(StepRecord(model, params, batch, w, STEPS[model], sorted(ts)[len(ts) // 2], ts, weight[w]))
    assert all(t > 0 for ts in times.values() for t in ts)


@pytest.mark.parametrize("batch", [1, 8])
def test_end_to_end_tinyworld(pytestconfig, batch):
    """Greedy proxy-tuned generation, both ways: equal tokens, tokens/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxytune.tinyworld import model_path
    from proxytune.tinyworld.evaluation import world_of

    table = LoraTable.of(pytestconfig)
    base, merged, stacked, names, _, _ = _pair("tinyworld")
    large = AutoModelForCausalLM.from_pretrained(model_path("large_base"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path("small_base"))
    prompts = [q.prompt for q in world_of().eval_questions()[:batch]]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]

    def two_models():
        big, ex, an = (ModelRunner(LocalModel.adopt(m, n)) for m, n in ((large, "base"), (merged, "expert"), (base, "anti")))
        x = big.prefill(ids, mask) + ex.prefill(ids, mask) - an.prefill(ids, mask)
        out = []
        for _ in range(E2E_NEW):
            t = x.argmax(-1)
            out.append(t)
            x = big.step(t) + ex.step(t) - an.step(t)
        return torch.stack(out, 1)

    def one_stack():
        big, pair = ModelRunner(LocalModel.adopt(large, "base")), StackedAdapterRunner(stacked, names, mixed="slices")
        s = pair.prefill(ids, mask)
        x = big.prefill(ids, mask) + s.experts[0] - s.anti
        out = []
        for _ in range(E2E_NEW):
            t = x.argmax(-1)
            out.append(t)
            s = pair.step(t)
            x = big.step(t) + s.experts[0] - s.anti
        return torch.stack(out, 1)

    ways = {"two models": two_models, "stacked slices": one_stack}
    with torch.inference_mode():
        first = {w: f() for w, f in ways.items()}  # warm-up, and the check
        assert torch.equal(first["two models"], first["stacked slices"])
        times: dict = {w: [] for w in ways}
        for k in range(E2E_ROUNDS):
            for w in (list(ways) if k % 2 == 0 else list(reversed(ways))):
                t0 = time.perf_counter()
                ways[w]()
                times[w].append(time.perf_counter() - t0)
    for w, ts in times.items():
        table.e2e.append(EndToEndRecord("loop", batch, w, E2E_NEW, sorted(ts)[len(ts) // 2], ts))


@pytest.mark.parametrize("speculative", [0, 4], ids=["eager", "speculative4"])
@pytest.mark.parametrize("batch", [1, 8])
def test_end_to_end_engine_tinyworld(pytestconfig, batch, speculative):
    """ProxyTuner.generate, eager, greedy, EOS ignored (every row makes E2E_NEW tokens): the merged expert and
    the base as two models against the adapter pair as members of one stacked forward; equal tokens, tokens/s."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxytune import Ensemble, ProxyTuner, SamplingParams
    from proxytune.engine.adapter_members import adapter_pairs
    from proxytune.tinyworld import default_models_dir, model_path
    from proxytune.tinyworld.evaluation import world_of

    table = LoraTable.of(pytestconfig)
    base, merged, _, _, _, _ = _pair("tinyworld")
    large = AutoModelForCausalLM.from_pretrained(model_path("large_base"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_path("small_base"))
    experts, antis = adapter_pairs(copy.deepcopy(base), [default_models_dir() / "small-lora"],
                                   anti_source=model_path("small_base"))  # fmt: skip
    ways = {
        "two models": ProxyTuner(large, [merged], [base], tokenizer=tok, decode="eager", device="cpu",
                                 speculative_tokens=speculative),
        "stacked slices": ProxyTuner(Ensemble(LocalModel.adopt(large, "base"), experts, antis, tokenizer=tok),
                                     speculative_tokens=speculative),
    }  # fmt: skip
    for t in ways.values():
        t.eos_token_ids = set()  # every row makes E2E_NEW tokens
    prompts = [q.prompt for q in world_of().eval_questions()[:batch]]
    params = SamplingParams(temperature=0.0, max_new_tokens=E2E_NEW)
    first = {w: [g.token_ids for g in t.generate(prompts, params)] for w, t in ways.items()}  # warm-up, the check
    assert first["two models"] == first["stacked slices"]
    assert all(len(ids) == E2E_NEW for ids in first["two models"])
    times: dict = {w: [] for w in ways}
    for k in range(E2E_ROUNDS):
        for w in (list(ways) if k % 2 == 0 else list(reversed(ways))):
            t0 = time.perf_counter()
            ways[w].generate(prompts, params)
            times[w].append(time.perf_counter() - t0)
    for w, ts in times.items():
        path = "engine" if not speculative else f"spec {speculative}"
        table.e2e.append(EndToEndRecord(path, batch, w, E2E_NEW, sorted(ts)[len(ts) // 2], ts))

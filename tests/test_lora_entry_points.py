"""LoRA experts from the entry points: ``proxytune generate`` / ``score`` with ``--expert-adapter``, lm-eval's
``expert_adapter=``, and ``vllm-config``'s refusal. Each result equals the merged two-model path's (each adapter
merged into a copy of its base, the untouched base as anti-expert); bad input is one error line naming the
flag, exit status 2. The tiny models and adapters are made here (tests/tiny_models.py, PEFT)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("peft")

from proxytune.cli import main  # noqa: E402
from tiny_models import PROMPTS, save_lora_adapter, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONTS = [" this is", " the lazy dog", " b", " small ones"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from tiny_models import save_lora_family

    return save_lora_family(tmp_path_factory.mktemp("lora-cli"))


def generated(capsys, argv) -> list[list[int]]:
    """The token ids of ``proxytune generate ARGV`` (greedy, JSON lines), one list per prompt."""
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    rc = main(["generate", *argv, *prompts, "--temperature", "0", "--max-new-tokens", "8", "--format", "jsonl", "-q"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return [json.loads(line)["token_ids"] for line in out.splitlines()]


def error_of(capsys, argv) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith("proxytune: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err[len("proxytune: error: ") : -1]


def test_generate_with_adapter_experts_equals_the_merged_two_model_path(lora, capsys):
    big, small, (a0, a1), (m0, m1) = lora["big"], lora["small"], lora["adapters"], lora["merged"]
    two = ["--base", big, "--expert", m0, "--anti-expert", small, "--expert", m1, "--anti-expert", small]
    want = generated(capsys, [*two, "--alpha", "1", "--alpha", "0.5"])
    assert generated(capsys, ["--base", big, "--expert-adapter", a0, "--expert-adapter", a1, "--alpha", "1",
                              "--alpha", "0.5"]) == want  # no --anti-expert: the adapters' recorded base
    assert generated(capsys, ["--base", big, "--expert-adapter", a0, "--anti-expert", small, "--expert-adapter", a1,
                              "--anti-expert", small, "--alpha", "1", "--alpha", "0.5"]) == want  # fmt: skip
    # an adapter beside a model expert, in command-line order; --anti-expert for the model expert only
    assert generated(capsys, ["--base", big, "--expert-adapter", a0, "--expert", m1, "--anti-expert", small,
                              "--alpha", "1", "--alpha", "0.5"]) == want  # fmt: skip
    one = generated(capsys, ["--base", big, "--expert", m0, "--anti-expert", small])
    assert one != want and generated(capsys, ["--base", big, "--expert-adapter", a0]) == one
    spec = generated(capsys, ["--base", big, "--expert-adapter", a0, "--speculative-tokens", "3"])
    assert spec == one


def test_score_with_an_adapter_expert_equals_the_merged_two_model_path(lora, capsys, tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n" for p, c in zip(PROMPTS, CONTS)))

    def score(*flags):
        assert main(["score", "--base", lora["big"], *flags, "-i", str(src), "-q"]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    want = score("--expert", lora["merged"][0], "--anti-expert", lora["small"], "--alpha", "1.5")
    got = score("--expert-adapter", lora["adapters"][0], "--alpha", "1.5")
    assert len(got) == len(want) == len(PROMPTS)
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"] and g["is_greedy"] == w["is_greedy"]
        assert g["token_logprobs"] == pytest.approx(w["token_logprobs"], abs=1e-4)


def test_bad_adapter_flags_are_one_line_naming_the_flag(lora, capsys, tmp_path):
    big, small, a0 = lora["big"], lora["small"], lora["adapters"][0]
    gen = ["generate", "--base", big, "--prompt", "hello", "-q"]
    assert error_of(capsys, [*gen, "--expert-adapter", str(tmp_path / "nowhere")]) == (
        f"--expert-adapter: no such adapter directory: {tmp_path / 'nowhere'}")
    assert "--expert-adapter" in error_of(capsys, [*gen, "--expert-adapter", big])  # a model, not an adapter
    assert "got 0 --expert and 1 --expert-adapter but 2 --anti-expert" in error_of(
        capsys, [*gen, "--expert-adapter", a0, "--anti-expert", small, "--anti-expert", small])
    # one --anti-expert per --expert beside an adapter: each after its --expert, else a forgotten one would pair
    # the rest silently with the wrong experts
    m1 = lora["merged"][1]
    assert error_of(capsys, [*gen, "--expert-adapter", a0, "--anti-expert", small, "--expert", m1]).startswith(
        f"--anti-expert {small}: given before --expert {m1}, the expert it pairs with")
    # an anti-expert that is not the adapter's base: the same config, other weights
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)
    message = error_of(capsys, [*gen, "--expert-adapter", a0, "--anti-expert", str(other)])
    assert message.startswith(f"anti-expert 0 {other} is not the base of --expert-adapter {a0}") and "different weights" in message
    # an adapter for another vocabulary (its recorded base has 200 ids) and for another architecture (GPT-2)
    wide = tmp_path / "wide"
    tiny_model("llama", vocab_size=200, seed=1).save_pretrained(wide)
    narrow = save_lora_adapter(tiny_model("llama", vocab_size=200, seed=1), tmp_path / "lora-200", 4, 4, ("q_proj",), str(wide))
    assert "--expert-adapter" in (m := error_of(capsys, [*gen, "--expert-adapter", narrow, "--anti-expert", small]))
    assert "is for another vocabulary" in m
    gpt2_dir = tmp_path / "gpt2"
    tiny_model("gpt2", seed=1).save_pretrained(gpt2_dir)
    gpt2 = save_lora_adapter(tiny_model("gpt2", seed=1), tmp_path / "lora-gpt2", 4, 4, ("c_attn",), str(gpt2_dir))
    m = error_of(capsys, [*gen, "--expert-adapter", gpt2, "--anti-expert", small])
    assert m.startswith(f"--expert-adapter {gpt2} is for another architecture"), m
    # a recorded base that is not here, and no --anti-expert
    away = save_lora_adapter(tiny_model("llama", seed=1), tmp_path / "lora-away", 4, 4, ("q_proj",), "someone/not-here")
    assert error_of(capsys, [*gen, "--expert-adapter", away]).startswith(
        "--anti-expert: not given, and the adapters' recorded base 'someone/not-here' is not on this machine")
    # static decoding, a template: refused naming the adapter pair
    assert "LoRA pair 0" in error_of(capsys, [*gen, "--expert-adapter", a0, "--decode", "static"])
    assert "expert 0: a LoRA adapter takes no template" in error_of(
        capsys, [*gen, "--expert-adapter", a0, "--expert-template", "chat"])
    assert "--expert-adapter: no such adapter directory" in error_of(
        capsys, ["score", "--base", big, "--expert-adapter", str(tmp_path / "nowhere"), "-i", str(tmp_path / "x")])


def test_vllm_config_refuses_adapters_saying_why(lora, capsys, tmp_path):
    out = tmp_path / "served"
    base = ["vllm-config", "--base", lora["big"], "-o", str(out)]
    why = "the vLLM plugin cannot take a LoRA adapter as an expert: vLLM applies a LoRA adapter per request"
    message = error_of(capsys, [*base, "--expert-adapter", lora["adapters"][0]])
    assert message.startswith(f"--expert-adapter {lora['adapters'][0]}: {why}") and "merge_and_unload" in message
    message = error_of(capsys, [*base, "--expert", lora["adapters"][0], "--anti-expert", lora["small"]])
    assert message.startswith(f"the expert 1 ({lora['adapters'][0]}): {why}")
    assert not out.exists()


def test_lm_eval_expert_adapter_equals_the_merged_two_model_path(lora):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from proxytune.integrations.lm_eval import ProxyTuneLM, ProxyTuneLMError

    big, small, (a0, a1), (m0, m1) = lora["big"], lora["small"], lora["adapters"], lora["merged"]
    kw = {"batch_size": 4, "device": "cpu"}
    two = ProxyTuneLM.create_from_arg_string(f"base={big},expert={m0}|{m1},anti_expert={small}|{small},weights=1|0.5", kw)
    got = [ProxyTuneLM.create_from_arg_string(f"base={big},expert_adapter={a0}|{a1},weights=1|0.5", kw),
           ProxyTuneLM.create_from_arg_string(f"base={big},expert={m0},expert_adapter={a1},anti_expert={small},"
                                              "weights=1|0.5", kw)]  # fmt: skip
    gen = [Instance(request_type="generate_until", doc={}, idx=i, arguments=(p, {"until": ["\n\n"], "max_gen_toks": 8,
                                                                                 "do_sample": False}))
           for i, p in enumerate(PROMPTS)]  # fmt: skip
    ll = [Instance(request_type="loglikelihood", doc={}, idx=i, arguments=(p, c)) for i, (p, c) in enumerate(zip(PROMPTS, CONTS))]
    want_gen, want_ll = two.generate_until(gen), two.loglikelihood(ll)
    for lm in got:
        assert lm.generate_until(gen) == want_gen
        for (g, gg), (w, wg) in zip(lm.loglikelihood(ll), want_ll):
            assert g == pytest.approx(w, abs=1e-4) and gg == wg
    cases = [
        (f"base={big},expert_adapter={os.path.join(small, 'nowhere')}", "expert_adapter: no such adapter directory"),
        (f"base={big},expert_adapter={a0},anti_expert={small}|{small}",
         "got 0 expert(s) and 1 expert_adapter(s) but 2 anti_expert(s)"),
        (f"base={big},expert_adapter={a0},expert_template=chat", "expert 0: a LoRA adapter takes no template"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(ProxyTuneLMError) as info:
            ProxyTuneLM.create_from_arg_string(args, kw)
        assert message in str(info.value) and info.value.__cause__ is None, str(info.value)

"""``proxytune generate`` end to end on tiny model directories saved to a temporary folder."""

import io
import json
import subprocess
import sys

import pytest

from proxytune import ProxyTuner
from proxytune.cli import main
from tiny_models import PROMPTS, save_tiny, save_trio, trio_args, tiny_tokenizer


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_trio(tmp_path_factory.mktemp("models"), ("llama", "qwen2", "qwen2"))


def args(dirs, *extra):
    return trio_args("generate", dirs, *extra)


def test_generate_text_matches_the_api(dirs, capsys):
    assert main(args(dirs, "--prompt", PROMPTS[0], "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
                     "--max-new-tokens", "6", "--alpha", "0.5")) == 0  # fmt: skip
    out = capsys.readouterr().out
    tuner = ProxyTuner(dirs["base"], dirs["expert"], dirs["anti"], weights=0.5, device="cpu")
    expected = tuner.generate(PROMPTS[0], temperature=0.8, top_p=0.9, seed=3, max_new_tokens=6)
    assert out == expected.text + "\n"


def test_generate_jsonl_from_a_file_and_stdin(dirs, capsys, tmp_path, monkeypatch):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:3]) + "\n\n")
    assert main(args(dirs, "--prompt-file", str(path), "--format", "jsonl", "--temperature", "0",
                     "--max-new-tokens", "5", "--logprobs")) == 0  # fmt: skip
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:3] and [r["index"] for r in rows] == [0, 1, 2]
    assert all(len(r["token_ids"]) == len(r["logprobs"]) <= 5 and r["finish_reason"] in ("eos", "length") for r in rows)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(PROMPTS[:3])))
    assert main(args(dirs, "--format", "jsonl", "--temperature", "0", "--max-new-tokens", "5")) == 0
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in rows]


def test_generate_streams_the_same_text(dirs, capsys, tmp_path):
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "0.7", "--seed", "1", "--max-new-tokens", "6"]
    assert main(args(dirs, *common)) == 0
    plain = capsys.readouterr().out
    assert main(args(dirs, *common, "--stream")) == 0
    assert capsys.readouterr().out == plain
    out = tmp_path / "events.jsonl"
    assert main(args(dirs, *common, "--stream", "--format", "jsonl", "-o", str(out))) == 0
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert {e["index"] for e in events} == {0, 1} and sum(e["finish_reason"] is not None for e in events) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "1.5", "--prompt", "x"], "proxytune: error: --top-p must be in (0, 1], got 1.5\n"),
        (["--temperature", "-1", "--prompt", "x"], "--temperature must be"),
        (["--alpha", "1", "--alpha", "2", "--prompt", "x"], "--alpha: give one for all pairs or one per pair"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file: no such file: /nonexistent/prompts.txt"),
    ],
)
def test_generate_reports_bad_parameters(dirs, capsys, extra, message):
    assert main(args(dirs, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # more cases, checked before loading: tests/test_cli_errors.py


def test_generate_reports_missing_and_incompatible_models(dirs, capsys, tmp_path):
    assert main(["generate", "--base", str(tmp_path / "nope"), "--prompt", "x", "-q"]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["generate", "--base", dirs["base"], "--expert", dirs["expert"], "--prompt", "x", "-q"]) == 2
    assert "1 --expert but 0 --anti-expert" in capsys.readouterr().err
    other = save_tiny(tmp_path / "other", "llama", seed=4, tokenizer=tiny_tokenizer(corpus=["zebra yak xylophone words"]))
    assert main(["generate", "--base", dirs["base"], "--expert", other, "--anti-expert", dirs["anti"], "--prompt", "x", "-q"]) == 2
    assert "disagree on" in capsys.readouterr().err


def test_python_dash_m_generate(dirs):
    cmd = [sys.executable, "-m", "proxytune", *args(dirs, "--prompt", "hello", "--max-new-tokens", "3", "--format", "jsonl")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    assert len(json.loads(out.stdout)["token_ids"]) <= 3


def test_generate_static_decode_gives_the_eager_tokens(dirs, capsys):
    common = ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--temperature", "0.8", "--seed", "5",
              "--max-new-tokens", "7", "--format", "jsonl"]  # fmt: skip
    assert main(args(dirs, *common, "--decode", "eager")) == 0
    eager = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert main(args(dirs, *common, "--decode", "static", "--poll-every", "3")) == 0
    static = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert static == eager and len(eager) == 2
    assert main(args(dirs, *common, "--decode", "graph")) == 2  # no CUDA here: a clear error, not a crash
    assert "needs a CUDA device" in capsys.readouterr().err

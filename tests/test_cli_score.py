"""``proxytune score``: JSON lines in, JSON lines out, the API's numbers; bad input is one error line, exit 2."""

import io
import json
import sys

import pytest

from proxytune import ProxyTuner
from proxytune.cli import main
from tiny_models import PROMPTS, save_trio, trio_args

CONTS = [" this is", " the lazy dog", [40, 41, 42], " small ones"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_trio(tmp_path_factory.mktemp("models"), ("llama", "llama", "llama"))


def args(dirs, *extra):
    return trio_args("score", dirs, *extra)


def write_pairs(path, prompts, conts):
    path.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n" for p, c in zip(prompts, conts)) + "\n")


def test_score_jsonl_matches_the_api(dirs, tmp_path, capsys, monkeypatch):
    src = tmp_path / "pairs.jsonl"
    write_pairs(src, PROMPTS, CONTS)
    out = tmp_path / "out.jsonl"
    assert main(args(dirs, "--input", str(src), "--alpha", "0.5", "--batch-size", "2", "-o", str(out))) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = ProxyTuner(dirs["base"], dirs["expert"], dirs["anti"], weights=0.5, device="cpu").score(PROMPTS, CONTS)
    assert [r["index"] for r in rows] == [0, 1, 2, 3]
    assert [r["continuation"] for r in rows] == CONTS
    for r, w in zip(rows, want):
        assert r["token_ids"] == w.token_ids and r["is_greedy"] == w.is_greedy
        assert r["token_logprobs"] == pytest.approx(w.token_logprobs, abs=1e-5)
        assert r["logprob"] == pytest.approx(w.logprob, abs=1e-5)
    monkeypatch.setattr(sys, "stdin", io.StringIO(src.read_text()))
    assert main(args(dirs, "--alpha", "0.5")) == 0  # stdin when --input is not given
    again = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["logprob"] for r in again] == pytest.approx([r["logprob"] for r in rows], abs=1e-5)


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a", "continuation": ""}'], 'line 1: "continuation" is empty'),
        (['{"prompt": "a"}'], 'line 1: expected a JSON object with "prompt" and "continuation"'),
        (["", 'not json'], "line 2: not JSON"),
        (['{"prompt": 3, "continuation": " x"}'], '"prompt" must be a string or an array of token ids, got a number'),
        (['{"prompt": "a", "continuation": [1, -2]}'], '"continuation" must be a string or an array of token ids'),
        ([""], "holds no prompt/continuation pairs"),
        ([json.dumps({"prompt": "a", "continuation": [7] * 600})], "takes at most 512"),
    ],
)
def test_bad_input_is_one_error_line(dirs, tmp_path, capsys, lines, message):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert main(args(dirs, "--input", str(src))) == 2
    err = capsys.readouterr().err
    assert err.startswith("proxytune: error: ") and err.count("\n") == 1 and message in err, err


def test_flags_are_checked_before_loading(tmp_path, capsys):
    src = tmp_path / "pairs.jsonl"
    write_pairs(src, ["a"], [" b"])
    for argv, message in [
        (["score", "--base", "x", "--expert", "e", "--input", str(src)], "1 --expert but 0 --anti-expert"),
        (["score", "--base", "x", "--alpha", "2", "--input", str(src)], "--alpha needs --expert"),
        (["score", "--base", "x", "--input", str(tmp_path / "none.jsonl")], "--input: no such file"),
        (["score", "--base", "x", "--batch-size", "0", "--input", str(src)], "--batch-size must be an integer >= 1"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("proxytune: error: ") and message in err, err

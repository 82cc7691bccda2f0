"""The CLI's handling of bad input: one line ``proxytune: error: ...`` naming the flag, exit status 2, nothing lost.

Almost every case here must fail before a model is loaded: ``no_models`` makes loading a test failure. The
output tests use ``FakeTuner`` (no model at all) to drive the CLI's writing code.
"""

import io
import json
import os
import stat
import sys

import pytest

import proxytune.engine
import proxytune.tinyworld.evaluation
from proxytune.backends import BackendUnavailableError
from proxytune.cli import main
from proxytune.engine import Generation, TokenEvent


class FakeTuner:
    """Stands in for ProxyTuner: answers prompt p with ``texts.get(p, p.upper())``, one event per character.
    ``fail_after``: raise ``error`` after that many generations (or streamed events)."""

    texts: dict = {}
    fail_after = None
    error: BaseException = ValueError("the engine failed")
    seen: list = []

    def __init__(self, *args, **kwargs):
        self.decode, self.decode_reason = "eager", None

    def _text(self, prompt):
        return self.texts.get(prompt, prompt.upper())

    def generate(self, prompts, params=None, return_logprobs=False, batch_size=None):
        FakeTuner.seen = list(prompts)
        out = []
        for p in prompts:
            if self.fail_after is not None and len(out) >= self.fail_after:
                raise self.error
            t = self._text(p)
            out.append(Generation(p, t, list(range(len(t))), "length", 0, [-1.0] * len(t) if return_logprobs else None))
        return out

    def stream(self, prompts, params=None, return_logprobs=False, batch_size=None):
        FakeTuner.seen = list(prompts)
        n = 0
        for i, p in enumerate(prompts):
            t = self._text(p)
            if not t:
                yield TokenEvent(i, None, "", None, "eos")
            for j, ch in enumerate(t):
                if self.fail_after is not None and n >= self.fail_after:
                    raise self.error
                n += 1
                yield TokenEvent(i, j, ch, -1.0 if return_logprobs else None, "length" if j == len(t) - 1 else None)


@pytest.fixture
def no_models(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the CLI loaded models before rejecting its input")

    monkeypatch.setattr(proxytune.engine, "ProxyTuner", refuse)
    monkeypatch.setattr(proxytune.tinyworld.evaluation, "build_tuners", refuse)


@pytest.fixture
def triton_as_installed(monkeypatch):
    """The triton backend as a user's CPU-only machine has it: without the interpreter (the triton tests set
    TRITON_INTERPRET=1 at import; the backend reads it when resolved). Restored afterwards."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield
    monkeypatch.undo()


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(FakeTuner, "texts", {})
    monkeypatch.setattr(FakeTuner, "fail_after", None)
    monkeypatch.setattr(FakeTuner, "error", ValueError("the engine failed"))
    monkeypatch.setattr(proxytune.engine, "ProxyTuner", FakeTuner)
    return FakeTuner


def gen(*extra, prompt=True):
    return ["generate", "--base", "/nowhere/base", "-q", *(["--prompt", "x"] if prompt else []), *extra]


def pair(*extra, **kw):
    return gen("--expert", "/nowhere/expert", "--anti-expert", "/nowhere/anti", *extra, **kw)


def error_of(capsys, argv):
    """Run the CLI, check that it failed with one error line on stderr and nothing on stdout; the line."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert out == "" and err.startswith("proxytune: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    return err[len("proxytune: error: ") : -1]


def run_ok(capsys, argv):
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


# --- 1. argparse's own errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--base", "b", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (gen("--max-new-tokens", "many"), "--max-new-tokens must be an integer >= 0, got 'many'"),
        (["demo", "--examples", "2.5"], "--examples must be an integer"),
        (["eval", "--limit", "x"], "--limit must be an integer"),
        (["frobnicate"], "invalid choice"),
        ([], "required: {demo,eval,generate,score,vllm-config}"),
        (["generate", "--prompt", "x"], "--base"),
        (gen("--decode", "fast"), "--decode: invalid choice"),
        (gen("--format", "csv"), "--format: invalid choice"),
        (["generate", "--base"], "--base: expected one argument"),
    ],
)
def test_argparse_errors_are_one_line(no_models, capsys, argv, message):
    assert message in error_of(capsys, argv)


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0 and "--max-new-tokens" in capsys.readouterr().out


# --- 3, 4 and others: generate's flags, checked before loading ------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be"),
        (["--batch-size", "0"], "--batch-size must be"),
        (["--poll-every", "0"], "--poll-every must be"),
        (["--poll-every", "99999999999999999999"], "--poll-every must be"),
        (["--top-k", "-1"], "--top-k must be"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--top-p", "0"], "--top-p must be"),
        (["--top-p", "nan"], "--top-p must be"),
        (["--temperature", "-1"], "--temperature must be"),
        (["--temperature", "1e39"], "--temperature must be"),  # inf in float32
        (["--temperature", "nan"], "--temperature must be"),
        (["--temperature", "inf"], "--temperature must be"),
        (["--min-p", "1"], "--min-p must be"),
        (["--min-p", "0.99999999999"], "--min-p must be"),  # 1 in float32
        (["--min-p", "-0.5"], "--min-p must be"),
        (["--seed", str(2**70)], "--seed must be"),
        (["--seed", str(-(2**63) - 1)], "--seed must be"),
        (["--stop", ""], "--stop must be"),
        (["--dtype", "float13"], "--dtype"),
        (["--tokenizer", ""], "--tokenizer must be"),
        (["--backend", "nope"], "--backend: unknown backend 'nope'"),
        (["--backend", "triton", "--device", "cpu"], "--backend: backend 'triton'"),
        (["--device", "tpu9"], "--device: "),
        (["--base-device", "tpu9"], "--base-device: "),
        (["--expert-device", "tpu9"], "--expert-device: "),
        (["--device", "meta"], "--device: "),
        (["--device", "cuda:999"], "--device: "),
        (["--logprobs"], "--logprobs needs --format jsonl"),
        (["--prompt", "caf\udce9"], "--prompt"),  # an invalid byte in argv (surrogateescape)
        (["--prompt-file", "/nonexistent/prompts.txt"], "--prompt-file: no such file: /nonexistent/prompts.txt"),
        (["--prompt-file", ""], "--prompt-file"),
        (["--output", "/nonexistent/dir/out.txt"], "--output: no such directory: /nonexistent/dir"),
    ],
)
def test_generate_rejects_bad_flags_before_loading(no_models, triton_as_installed, capsys, extra, message):
    assert message in error_of(capsys, gen(*extra))


def test_generate_rejects_empty_model_paths_and_bad_alphas(no_models, capsys):
    assert "--base must be" in error_of(capsys, ["generate", "--base", "", "--prompt", "x"])
    assert "--expert must be" in error_of(capsys, gen("--expert", "", "--anti-expert", "a"))
    assert "--anti-expert must be" in error_of(capsys, gen("--expert", "e", "--anti-expert", ""))
    for value in ("nan", "inf", "-inf", "1e39"):
        assert "--alpha must be" in error_of(capsys, pair("--alpha", value))
    assert "--alpha" in error_of(capsys, pair("--alpha", "1", "--alpha", "2"))
    assert "--temperature must be" in error_of(capsys, gen("--temperature", "-1e-3"))  # a number, not a flag
    assert "1 --expert but 0 --anti-expert" in error_of(capsys, gen("--expert", "e"))


def test_generate_rejects_directories_as_files(no_models, capsys, tmp_path):
    assert "--prompt-file: " in error_of(capsys, gen("--prompt-file", str(tmp_path), prompt=False))
    assert "--output: " in error_of(capsys, gen("-o", str(tmp_path)))
    (tmp_path / "f").write_text("a file")
    assert "--output: " in error_of(capsys, gen("-o", str(tmp_path / "f" / "out.txt")))


def test_engine_errors_after_loading_are_one_line(fake, capsys):
    fake.fail_after = 0
    fake.error = BackendUnavailableError("backend 'triton' is unavailable: no GPU")
    assert "backend 'triton' is unavailable" in error_of(capsys, gen())
    fake.error = RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory\nframe #0: c10::...")
    assert "can't allocate memory" in error_of(capsys, gen("--max-new-tokens", "100000"))


def test_interrupt_is_one_line(fake, capsys):
    fake.fail_after, fake.error = 0, KeyboardInterrupt()
    assert main(gen()) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "proxytune: interrupted\n"


def test_a_closed_stdout_ends_quietly(fake, capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(gen("--stream")) == 1
    assert capsys.readouterr().err == ""


# --- 2. -o writes the file only on success -----------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_output_file_is_replaced_only_on_success(fake, capsys, tmp_path, stream):
    out = tmp_path / "out.txt"
    out.write_text("old contents\n")
    os.chmod(out, 0o640)
    s = ["--stream"] if stream else []
    fake.fail_after = 1
    assert "the engine failed" in error_of(capsys, gen("--prompt", "y", "-o", str(out), *s))
    assert out.read_text() == "old contents\n" and sorted(os.listdir(tmp_path)) == ["out.txt"]
    fake.fail_after = None
    assert run_ok(capsys, gen("--prompt", "y", "-o", str(out), *s)) == ""
    assert out.read_text() == "==> prompt 0: 'x' <==\nX\n==> prompt 1: 'y' <==\nY\n"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"] and stat.S_IMODE(os.stat(out).st_mode) == 0o640
    fake.fail_after = 0  # a file that did not exist is not created by a failed run
    assert "the engine failed" in error_of(capsys, gen("-o", str(tmp_path / "new.txt"), *s))
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_output_may_be_the_prompt_file_a_link_or_a_device(fake, capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    fake.fail_after = 1  # a failed run leaves the prompts where they were
    error_of(capsys, gen("--prompt-file", str(prompts), "-o", str(prompts), prompt=False))
    assert prompts.read_text() == "a\nb\n"
    fake.fail_after = None
    run_ok(capsys, gen("--prompt-file", str(prompts), "-o", str(prompts), "--format", "jsonl", prompt=False))
    assert [json.loads(line)["text"] for line in prompts.read_text().splitlines()] == ["A", "B"]
    link = tmp_path / "link.txt"
    link.symlink_to(prompts)
    run_ok(capsys, gen("-o", str(link)))
    assert link.is_symlink() and prompts.read_text() == "X\n"
    run_ok(capsys, gen("-o", os.devnull))
    assert stat.S_ISCHR(os.stat(os.devnull).st_mode)


# --- 4, 5, 6: demo and eval ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--examples", "0"], "--examples must be"),
        (["demo", "--examples", "-2"], "--examples must be"),
        (["demo", "--limit", "0"], "--limit must be"),
        (["eval", "--limit", "-3"], "--limit must be"),
        (["eval", "--threads", "-1"], "--threads must be"),
        (["eval", "--threads", "0"], "--threads must be"),
        (["eval", "--threads", "99999999999999"], "--threads must be"),
        (["eval", "--batch-size", "0"], "--batch-size must be"),
    ],
)
def test_demo_and_eval_reject_bad_numbers(no_models, capsys, argv, message):
    assert message in error_of(capsys, argv)


@pytest.mark.parametrize("command", ["demo", "eval"])
def test_models_must_be_a_family_directory(no_models, capsys, tmp_path, command):
    assert error_of(capsys, [command, "--models", "/nonexistent"]) == "--models: no such directory: /nonexistent"
    assert "--models: " in error_of(capsys, [command, "--models", str(tmp_path)])  # exists, holds no family
    (tmp_path / "f").write_text("")
    assert "--models: " in error_of(capsys, [command, "--models", str(tmp_path / "f")])


def test_models_from_the_environment_are_named_so(no_models, capsys, monkeypatch):
    monkeypatch.setenv("PROXYTUNE_TINYWORLD_MODELS", "/nonexistent/family")
    assert "PROXYTUNE_TINYWORLD_MODELS" in error_of(capsys, ["demo"])


def test_eval_save_is_checked_before_evaluating(no_models, capsys, tmp_path):
    (tmp_path / "f").write_text("keep")
    assert "--save: " in error_of(capsys, ["eval", "--limit", "4", "--save", str(tmp_path / "f")])
    assert "--save: " in error_of(capsys, ["eval", "--limit", "4", "--save", str(tmp_path / "f" / "sub")])
    (tmp_path / "d" / "tinyworld_eval.json").mkdir(parents=True)
    assert "--save: " in error_of(capsys, ["eval", "--limit", "4", "--save", str(tmp_path / "d")])
    assert (tmp_path / "f").read_text() == "keep"


# --- 7, 8, 9: reading prompts --------------------------------------------------------------------------


def test_prompts_are_split_on_newlines_only(fake, capsys, tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_bytes("a\x0cb\r\nc\u2028d\x1ce\n\n  \nf\x85g\r\n".encode())
    run_ok(capsys, gen("--prompt-file", str(path), "--format", "jsonl", prompt=False))
    assert fake.seen == ["a\x0cb", "c\u2028d\x1ce", "f\x85g"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("h\x0bi\r\nj\n".encode())))
    run_ok(capsys, gen("--format", "jsonl", prompt=False))
    assert fake.seen == ["h\x0bi", "j"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n \r\n")))
    assert "no prompts: stdin holds none" in error_of(capsys, gen(prompt=False))
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfk\n")
    run_ok(capsys, gen("--prompt-file", str(bom), prompt=False))
    assert fake.seen == ["k"]


def test_undecodable_prompt_sources_are_one_line(no_models, capsys, tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_bytes(b"fine\nbad \xff here\n")
    message = error_of(capsys, gen("--prompt-file", str(path), prompt=False))
    assert message.startswith(f"{path}: ") and "byte offset 9 (line 2)" in message
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x89PNG\r\n\x1a\n\x00\x00")))
    message = error_of(capsys, gen(prompt=False))
    assert message.startswith("stdin: ") and "byte offset 0 (line 1)" in message
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"x\n")))
    assert "--prompt" in error_of(capsys, gen("--prompt", "\udcff", prompt=False))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": 5}', 'line 2: "prompt" must be a string'),
        ('{"prompt": ["a"]}', 'line 2: "prompt" must be a string'),
        ('{"prompt": null}', 'line 2: "prompt" must be a string'),
        ('{"prompt": "\\ud800"}', 'line 2: "prompt"'),
        ('["prompt"]', 'line 2: expected a JSON object with a "prompt" field'),
        ('{"text": "a"}', 'line 2: expected a JSON object with a "prompt" field'),
        ("{not json", "line 2: "),
    ],
)
def test_jsonl_prompts_must_be_strings(no_models, capsys, tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    assert error_of(capsys, gen("--prompt-file", str(path), prompt=False)).startswith(f"{path}, {message}")


# --- 11: text output ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_text_output_adds_a_newline_only_where_missing(fake, capsys, stream):
    fake.texts = {"a": "first\n", "b": "second", "c": ""}
    s = ["--stream"] if stream else []
    assert run_ok(capsys, gen("--prompt", "a", *s, prompt=False)) == "first\n"
    out = run_ok(capsys, gen(*s, "--prompt", "a", "--prompt", "b", "--prompt", "c", prompt=False))
    assert out == "==> prompt 0: 'a' <==\nfirst\n==> prompt 1: 'b' <==\nsecond\n==> prompt 2: 'c' <==\n\n"


def test_pair_options_without_pairs_are_errors(no_models, capsys):
    assert "--alpha needs --expert and --anti-expert" in error_of(capsys, ["generate", "--base", "b", "--prompt", "x", "--alpha", "0.5"])
    assert "--expert-template needs --expert" in error_of(
        capsys, ["generate", "--base", "b", "--prompt", "x", "--expert-template", "chat"]
    )


# --- issue 23: repeats of file flags, the weight bound, negative numbers after a short flag ------------------


@pytest.mark.parametrize("argv, flag", [
    (gen("--prompt-file", "a.txt", "--prompt-file", "b.txt", prompt=False), "--prompt-file"),
    (gen("-o", "a.txt", "--output", "b.txt"), "--output"),
    (gen("--tokenizer", "t1", "--tokenizer", "t2"), "--tokenizer"),
    (["generate", "--base", "b1", "--base", "b2", "--prompt", "x"], "--base"),
    (["score", "--base", "b", "-i", "a.jsonl", "--input", "b.jsonl"], "--input"),
    (["vllm-config", "--base", "b", "--expert", "e", "--anti-expert", "a", "-o", "x", "-o", "y"], "--output"),
])  # fmt: skip
def test_a_repeated_file_flag_is_refused_not_replaced(no_models, capsys, argv, flag):
    message = error_of(capsys, argv)
    assert message.startswith(f"{flag}: given twice") and "give it once" in message, message


@pytest.mark.parametrize("value", ["-inf", "inf", "nan", "3e38", "-3.4e38", "1.000001e6"])
@pytest.mark.parametrize("command", ["generate", "score"])
def test_alpha_out_of_the_weight_bound_is_named(no_models, capsys, value, command):
    argv = [command, "--base", "b", "--expert", "e", "--anti-expert", "a", "--alpha", value]
    argv += ["--prompt", "x"] if command == "generate" else ["-i", "in.jsonl"]
    assert error_of(capsys, argv) == f"--alpha must be a finite number with |w| <= 1e6, got {value}"


def test_alpha_at_the_weight_bound_passes_the_flags(no_models, capsys, tmp_path):
    # -1e6 is a value (not a flag) and within the bound: the command gets as far as loading (refused here)
    pairs = tmp_path / "in.jsonl"
    pairs.write_text('{"prompt": "a", "continuation": " b"}\n')
    with pytest.raises(AssertionError, match="loaded models"):
        main(["score", "--base", "b", "--expert", "e", "--anti-expert", "a", "--alpha", "-1e6", "-i", str(pairs)])

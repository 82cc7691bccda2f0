"""The served base through the entry points: ``proxytune generate`` / ``score`` with ``--base-url`` and
lm-eval's ``base_url=``, against the fake of vLLM's completions server (tests/fake_completions.py) on a real
loopback port, and against dead URLs: the same output as the local base with ``--base-logprobs all``; every
bad flag one line, exit 2."""

import json
import socket
import time

import pytest

pytest.importorskip("httpx")

from fake_completions import FakeCompletions, Loopback  # noqa: E402
from tiny_models import save_trio  # noqa: E402

from proxytune.cli import main  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_trio(tmp_path_factory.mktemp("served_trio"))


@pytest.fixture(scope="module")
def served(dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype="float32")
    with Loopback(FakeCompletions(base, AutoTokenizer.from_pretrained(dirs["base"]), max_logprobs=-1)) as s:
        yield s


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _pairs(dirs):
    return ["--expert", dirs["expert"], "--anti-expert", dirs["anti"], "--alpha", "0.7", "-q"]


def test_generate_with_a_served_base_equals_the_local_base(dirs, served, capsys):
    flags = ["--prompt", "the cat", "--prompt", "one two three", "--max-new-tokens", "9", "--temperature", "0",
             "--format", "jsonl", *_pairs(dirs)]  # fmt: skip
    for block in ("1", "adaptive"):
        assert main(["generate", "--base-url", served.url, "--base-logprobs", "all", "--base-block", block, *flags]) == 0
        remote = [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()]
        assert main(["generate", "--base", dirs["base"], *flags]) == 0
        local = [json.loads(x)["token_ids"] for x in capsys.readouterr().out.splitlines()]
        assert remote == local and len(remote) == 2


def test_score_with_a_served_base_equals_the_local_base(dirs, served, capsys, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "continuation": c}) + "\n"
                             for p, c in [("the cat", " sat"), ("one two", " three four")]))  # fmt: skip
    assert main(["score", "--base-url", served.url, "--base-logprobs", "all", "-i", str(pairs), *_pairs(dirs)]) == 0
    remote = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert main(["score", "--base", dirs["base"], "-i", str(pairs), *_pairs(dirs)]) == 0
    local = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    for r, l in zip(remote, local):
        assert r["token_ids"] == l["token_ids"] and r["is_greedy"] == l["is_greedy"]
        assert r["logprob"] == pytest.approx(l["logprob"], abs=1e-3)


@pytest.mark.parametrize("flags, message", [
    (["--base-url", "URL", "--base", "B"], "--base and --base-url: give one base"),
    ([], "generate needs a base: --base (a model) or --base-url (a served model)"),
    (["--base", "B", "--base-logprobs", "5"], "--base-logprobs needs --base-url"),
    (["--base-url", "URL", "--base-logprobs", "0"], "--base-logprobs must be an integer >= 1 or 'all', got '0'"),
    (["--base-url", "URL", "--base-tail", "low"], "--base-tail must be 'drop' or 'floor', got 'low'"),
    (["--base-url", "URL", "--base-block", "many"], "--base-block must be an integer >= 1 or 'adaptive'"),
    (["--base-url", "URL", "--base-tail", "floor", "--base-block", "4"], "--base-block=4 with --base-tail=floor"),
    (["--base-url", "URL", "--base-device", "cpu"], "--base-device applies to a local --base"),
    (["--base-url", "URL", "--base-model", "other"], "does not serve the model 'other'; it serves: base"),
    (["--base-url", "ftp://host"], "--base-url must be an http:// or https:// address with a host"),
    (["--base-url", "http://"], "--base-url must be an http:// or https:// address with a host"),
    (["--base-url", "URL", "--base-logprobs", "all", "--base-model", "base"], None),
])  # fmt: skip
def test_bad_flags_are_one_line_exit_2(dirs, served, capsys, flags, message):
    flags = [served.url if f == "URL" else dirs["base"] if f == "B" else f for f in flags]
    code = main(["generate", *flags, "--prompt", "hi", "--max-new-tokens", "2", *_pairs(dirs)])
    err = capsys.readouterr().err
    if message is None:
        assert code == 0 and err == ""
        return
    assert code == 2 and err.count("\n") == 1 and err.startswith("proxytune: error: ") and message in err


def test_a_dead_url_is_one_line_naming_it(dirs, capsys):
    url = _dead_url()
    assert main(["generate", "--base-url", url, "--prompt", "hi", *_pairs(dirs)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"proxytune: error: {url}/v1/models: listing the served models failed" in err


def test_lm_eval_base_url(dirs, served):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from proxytune import ProxyTuner
    from proxytune.integrations.lm_eval import ProxyTuneLM, ProxyTuneLMError

    remote = ProxyTuneLM(base_url=served.url, base_logprobs="all", expert=dirs["expert"], anti_expert=dirs["anti"],
                         weights="0.7", batch_size=2)  # fmt: skip
    local = ProxyTuneLM(tuner=ProxyTuner(dirs["base"], dirs["expert"], dirs["anti"], weights=0.7, device="cpu"), batch_size=2)
    reqs = [Instance("loglikelihood", {}, (c, x), i) for i, (c, x) in enumerate([("the cat", " sat"), ("one", " two")])]
    for (a, ga), (b, gb) in zip(remote.loglikelihood(reqs), local.loglikelihood(reqs)):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb
    gen = [Instance("generate_until", {}, ("the cat", {"until": ["\n"], "max_gen_toks": 6}), 0)]
    assert remote.generate_until(gen) == local.generate_until(gen)
    for args, message in [(dict(base_url=served.url, base=dirs["base"]), r"base= \(a model\) or base_url="),
                          (dict(base=dirs["base"], base_tail="floor"), "base_tail needs base_url="),
                          (dict(base_url=served.url, base_logprobs="x"), "base_logprobs must be"),
                          (dict(base_url=served.url, base_tail="floor", base_block="8"), "base_block=8 with base_tail=floor"),
                          (dict(base_url="ftp://host"), "base_url must be an http:// or https:// address"),
                          (dict(base_url=_dead_url()), "base_url: http://127.0.0.1")]:  # fmt: skip
        with pytest.raises(ProxyTuneLMError, match=message):
            ProxyTuneLM(expert=dirs["expert"], anti_expert=dirs["anti"], **args)
    t0 = time.monotonic()  # refused before the server is asked (a dead URL would take seconds of retries)
    with pytest.raises(ProxyTuneLMError, match="give tuner= or base= / base_url="):
        ProxyTuneLM(tuner=local.tuner, base_url=_dead_url())
    assert time.monotonic() - t0 < 1


def test_the_python_api_takes_a_served_base_by_url(dirs, served):
    from proxytune import ProxyTuner, RemoteModel

    tuner = ProxyTuner(RemoteModel(served.url, logprobs="all"), dirs["expert"], dirs["anti"], weights=0.7, device="cpu")
    local = ProxyTuner(dirs["base"], dirs["expert"], dirs["anti"], weights=0.7, device="cpu")
    prompts = ["the cat", "one two three"]
    got = tuner.generate(prompts, max_new_tokens=8, temperature=0.0)
    assert [g.token_ids for g in got] == [g.token_ids for g in local.generate(prompts, max_new_tokens=8, temperature=0.0)]
    assert "RemoteModel" not in repr(tuner) and served.url in repr(tuner)


def test_the_python_api_reaches_the_server_before_loading_the_local_models(dirs, monkeypatch):
    """A served base that refuses (a dead URL, a logprobs above its cap) fails before any local model loads."""
    import proxytune.engine.loading as loading
    from proxytune import ProxyTuner, RemoteModel
    from proxytune.remote.client import RemoteError

    def no_load(*args, **kwargs):
        raise AssertionError("a local model loaded before the server was asked")

    from transformers import AutoModelForCausalLM

    capped = FakeCompletions(AutoModelForCausalLM.from_pretrained(dirs["base"], dtype="float32"), max_logprobs=20)
    monkeypatch.setattr(loading, "load_model", no_load)
    for member, message in [(RemoteModel(_dead_url(), max_retries=0), "cannot connect"),
                            (RemoteModel("http://capped.test", logprobs=50, transport=capped.transport()),
                             "logprobs=50 .*greater than max allowed: 20")]:  # fmt: skip
        with pytest.raises(RemoteError, match=message):
            ProxyTuner(member, dirs["expert"], dirs["anti"], device="cpu")


def test_a_server_lost_mid_generation_is_one_clear_error(dirs):
    """The server answers a few completions, then the connection is refused for good: generation stops with one
    RemoteUnreachable naming the URL after the bounded retries; the CLI prints it as one line (exit 2)."""
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxytune import ProxyTuner, RemoteModel
    from proxytune.remote.client import RemoteUnreachable

    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype="float32")
    fake = FakeCompletions(base, AutoTokenizer.from_pretrained(dirs["base"]))

    def flaky(request):
        if request.url.path == "/v1/completions" and len(fake.log) >= 3:
            raise httpx.ConnectError("Connection refused", request=request)
        return fake(request)

    member = RemoteModel("http://lost.test:8000", block=2, max_retries=2, transport=httpx.MockTransport(flaky))
    member.client._sleep = lambda s: None  # no real waiting between the retries
    tuner = ProxyTuner(member, dirs["expert"], dirs["anti"], device="cpu")
    with pytest.raises(RemoteUnreachable, match=r"^http://lost.test:8000/v1/completions: a completion failed after 3 "
                                                r"attempts: cannot connect \(Connection refused\)$"):  # fmt: skip
        tuner.generate(["the cat"], max_new_tokens=20, temperature=0.0)
    assert len(fake.log) == 3

"""The fused sampler compiled ahead of time for real GPU targets, on this machine (no GPU needed).

``proxytune.kernels.aot`` compiles the launch the launcher would make on ``sm_80`` / ``sm_90`` with triton's
bundled ptxas and reads its register report. The default suite compiles one sm_90 configuration (about 10 s)
and checks that nothing spills; ``-m slow`` compiles the whole table the launch settings were chosen on, and
every constexpr variant the launcher can choose (pairs 0-4, each filter compiled out, no log-probabilities).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from proxytune.kernels import aot  # noqa: E402
from proxytune.kernels.launch import NUM_WARPS, launch_settings  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning")

TABLE_VOCABS = (32000, 50257, 128256, 151936, 262144)  # Llama-2, GPT-2 (odd width), Llama-3, Qwen2, Gemma-3


def _assert_fits(report: dict) -> None:
    assert report["spill_bytes"] == 0 and report["stack_bytes"] == 0, report
    assert 0 < report["registers"] <= 255, report
    assert report["shared_bytes"] <= 48 * 1024, report  # no opt-in shared memory needed on any target


def test_sm90_bf16_batch64_compiles_without_spills():
    report = aot.compile_report(90, "bfloat16", 64, 128256)
    _assert_fits(report)
    settings = launch_settings(64, 128256, aot.DEFAULT_SMS[90])
    assert (report["num_warps"], report["block"], report["cap"], report["split"]) == (
        NUM_WARPS, settings.block, settings.cap, settings.split,
    )  # fmt: skip


def test_the_tool_refuses_bad_arguments_before_compiling():
    cmd = [sys.executable, "-m", "proxytune.kernels.aot"]
    for bad in (["--num-warps", "3"], ["--batch", "0"], ["--ptx-out", "x.ptx", "--batch", "1", "64"],
                ["--dtype", "float64"], ["--pairs", "-1"]):  # fmt: skip
        out = subprocess.run(cmd + bad, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, (bad, out.stderr)
        assert "error:" in out.stderr and "Traceback" not in out.stderr, (bad, out.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_whole_table_compiles_without_spills(arch, dtype):
    for batch in (1, 64, 256):
        for vocab in TABLE_VOCABS:
            _assert_fits(aot.compile_report(arch, dtype, batch, vocab))


@pytest.mark.slow
def test_every_constexpr_variant_compiles(tmp_path):
    variants = [dict(pairs=p) for p in range(5)]
    variants += [dict(filters=f) for f in ((False, True, True), (True, False, True), (True, True, False),
                                           (False, False, False))]  # fmt: skip
    variants += [dict(write_logprobs=False)]
    for kwargs in variants:
        _assert_fits(aot.compile_report(90, "bfloat16", 8, 32000, **kwargs))
    ptx = tmp_path / "k.ptx"
    out = subprocess.run([sys.executable, "-m", "proxytune.kernels.aot", "--arch", "80", "--dtype", "float16",
                          "--batch", "256", "--vocab", "50257", "--pairs", "2", "--ptx-out", str(ptx), "--json"],
                         capture_output=True, text=True, timeout=600, check=True)  # fmt: skip
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["arch"] == 80 and report["pairs"] == 2 and report["ptx_file"] == str(ptx)
    assert ".target sm_80" in ptx.read_text()
    _assert_fits(report)

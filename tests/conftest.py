import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download: they build tiny models or use the shipped ones
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    # Without a GPU the Triton kernel runs in triton's interpreter. Set here, before any test module is
    # imported: once some module imports triton's machinery without it (peft does), the interpreter no
    # longer takes the kernels ("Cannot call @triton.jit'd outside of the scope of a kernel").
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests (marked ``cuda``) skip cleanly on machines without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tok():
    """The tiny tokenizer of tests/tiny_models.py, one per module (tests may set its padding side)."""
    from tiny_models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine cost up to 40x per
    forward). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trios():
    """Per kind of tests/tiny_models.py (llama, qwen2, gpt2): ``(base, expert, anti_expert)``, tiny random-weight
    models with different weights (seeds 0, 1, 2); one set per test module (a module may move them to a GPU)."""
    from tiny_models import KINDS, tiny_trio

    return {kind: tiny_trio(kind) for kind in KINDS}

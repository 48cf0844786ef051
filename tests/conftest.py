import os
import zlib

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. It must be
# switched on before triton is first imported (fastnoise imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "cuda_emulated: the CUDA kernels run on the CPU by the "
                            "host emulator of tests/cuda_emu (needs g++)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _inputs_seed(request):
    """Random inputs from a seed pinned per test (a hash of its id), so a failure, a tight
    tolerance one included, reproduces on the next run; printed, and shown when a test fails.
    FASTNOISE_TEST_SEED=<int> sets one seed for every test, =random draws fresh ones."""
    chosen = os.environ.get("FASTNOISE_TEST_SEED", "")
    if chosen == "random":
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    elif chosen:
        seed = int(chosen)
    else:
        seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    print(f"input seed: FASTNOISE_TEST_SEED={seed}")
    yield

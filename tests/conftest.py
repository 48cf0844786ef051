import os

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
def _fresh_inputs():
    # fresh random inputs on every run; the seed is printed, and shown when a test fails
    seed = int.from_bytes(os.urandom(8), "little") >> 1
    if os.environ.get("FASTNOISE_TEST_SEED"):
        seed = int(os.environ["FASTNOISE_TEST_SEED"])
    torch.manual_seed(seed)
    print(f"input seed: FASTNOISE_TEST_SEED={seed}")
    yield

"""DeepSpeed ZeRO on the CPU: 2 gloo processes on loopback, spawned and bounded in time.

One worker run serves several checks (DeepSpeed and transformers take seconds to import):
ZeRO-3 NoisyTune on the partitions equal to the unpartitioned result, its errors, patch
before/after ``deepspeed.initialize`` and training steps, ZeRO-2, FSDP1 refused, and
``FastNoiseCallback`` under ``Trainer`` with a ZeRO-3 config.
"""

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # subprocesses; .ci/run runs them (-m 'not slow' skips)

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)
# looked up, not imported: deepspeed patches torch on import, and only the workers need it
# (an installed but broken deepspeed fails the workers, loudly)
for _module in ("deepspeed", "transformers"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (pip install -e '.[test]')",
                    allow_module_level=True)

WORKER = pathlib.Path(__file__).with_name("zero_worker.py")
ROOT = WORKER.parents[1]  # the workers import this checkout's fastnoise, not an installed one


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(phase, timeout=300):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   OMP_NUM_THREADS="1", TORCH_CPP_LOG_LEVEL="ERROR",
                   TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), phase], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-6000:]}"
        assert f"rank {rank}: ok" in out, out[-6000:]


def test_zero3_noisytune_patch_training_zero2_fsdp1():
    _run("zero")


def test_trainer_with_a_zero3_config():
    _run("trainer")

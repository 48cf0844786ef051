"""torch.distributed on the CPU: 2 gloo processes on loopback, spawned and bounded in time."""

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

WORKER = pathlib.Path(__file__).with_name("dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_noise_noisytune_ddp_and_fsdp2_patch():
    root = str(WORKER.parents[1])  # this checkout's fastnoise, not an installed one
    env = dict(os.environ, PORT=str(_free_port()), OMP_NUM_THREADS="1",
               TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out}"
        assert f"rank {rank}: ok" in out
        assert f"rank {rank}: fsdp2 and ddp patch checks passed" in out

"""``python -m fastnoise check`` (and bench, when present) on the CPU."""

import subprocess
import sys

import pytest
import torch

from fastnoise import backends, check
from fastnoise.backends import ReferenceBackend


class _WrongNoise(ReferenceBackend):
    """A test double: right shapes, wrong noise (the stream of another seed)."""

    name = "broken"

    def embedding_forward(self, ids, weight, out, *, seed, **kwargs):
        super().embedding_forward(ids, weight, out, seed=seed + 1, **kwargs)


class _HalfScaleNoise(ReferenceBackend):
    """Right stream, wrong scale: only the statistics of the noise give it away."""

    name = "halfscale"

    def embedding_forward(self, ids, weight, out, *, mag, tok_mag, **kwargs):
        tok_mag = None if tok_mag is None else tok_mag / 2
        super().embedding_forward(ids, weight, out, mag=mag / 2, tok_mag=tok_mag, **kwargs)


def test_check_command_passes_and_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "fastnoise", "check", "--device", "cpu",
                           "--backend", "reference"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "backend" in proc.stdout and "max error" in proc.stdout
    assert "philox4x32-10 KAT" in proc.stdout and "forward/bernoulli" in proc.stdout
    assert " 0 failed" in proc.stdout


@pytest.mark.parametrize("double", [_WrongNoise, _HalfScaleNoise])
def test_check_fails_on_a_broken_backend(double, monkeypatch, capsys):
    monkeypatch.setitem(backends._REGISTRY, "cpu", double())
    assert check.main(["--device", "cpu", "--backend", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out
    rows = check.run_checks("cpu", ["cpu"])
    failed = {r.op for r in rows if r.status == "FAIL"}
    if double is _WrongNoise:
        assert {"forward/uniform", "forward/gaussian", "forward/bernoulli"} <= failed
    else:
        assert {"stats/uniform", "stats/gaussian", "forward/uniform"} <= failed


def test_main_usage():
    from fastnoise.__main__ import main
    assert main(["--help"]) == 0
    assert main(["nonsense"]) == 2

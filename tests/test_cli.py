"""``python -m fastnoise check`` (and bench, when present) on the CPU."""

import subprocess
import sys

import pytest

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


def test_bench_quick_writes_csv_and_png(tmp_path):
    csv_path, png_path = tmp_path / "bench.csv", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "fastnoise", "bench", "--device", "cpu",
                           "--quick", "--csv", str(csv_path), "--plot", str(png_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "copy bandwidth" in proc.stdout and "speedup vs peers" in proc.stdout
    assert "F.embedding" in proc.stdout and "hf_hook" in proc.stdout
    # --quick times no shape the targets are for: it says so instead of grading
    assert "targets: not graded" in proc.stdout and "snippet_loop" in proc.stdout
    assert "MISSED" not in proc.stdout
    assert "[  1]" in proc.stderr  # progress while it runs
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("workload,impl,ms") and len(rows) > 10
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_derives_ratios():
    from fastnoise.bench import Result, _derive
    rows = [Result("w", "F.embedding", 1.0, 10**9, None),
            Result("w", "hf_hook", 4.0, 10**9, None),
            Result("w", "fastnoise[x]", 2.0, 10**9, None)]
    _derive(rows, copy_gbps=1000.0)
    assert rows[2].speedups == {"F.embedding": 0.5, "hf_hook": 2.0}
    assert rows[2].gbps == 500.0 and rows[2].pct_copy == 50.0


def test_bench_reports_cpu_targets():
    from fastnoise.bench import Result, _derive, format_targets
    from fastnoise.bench import TARGET_SHAPE
    s = TARGET_SHAPE
    rows = [Result(f"forward/bernoulli {s}", "F.embedding", 1.0, 1, None),
            Result(f"forward/bernoulli {s}", "fastnoise[cpu]", 1.4, 1, None),
            Result(f"forward/gaussian {s}", "F.embedding", 1.0, 1, None),
            Result(f"forward/gaussian {s}", "torch_gaussian", 9.0, 1, None),
            Result(f"forward/gaussian {s}", "fastnoise[cpu]", 6.0, 1, None),
            Result("forward/gaussian B=1 L=8 d=4 V=9", "F.embedding", 1.0, 1, None),
            Result("forward/gaussian B=1 L=8 d=4 V=9", "fastnoise[cpu]", 60.0, 1, None),
            Result("noisytune s", "snippet_loop", 9.0, 1, None),
            Result("noisytune s", "fastnoise[cpu]", 2.0, 1, None)]
    _derive(rows, copy_gbps=1.0)
    lines = format_targets(rows).splitlines()[1:]
    assert len(lines) == 4
    assert "1.40x the time of F.embedding (target <= 1.5x)" in lines[0] and "met" in lines[0]
    assert "6.00x the time of F.embedding" in lines[1] and lines[1].endswith("MISSED")
    assert "1.50x faster than torch_gaussian (target >= 2.0x)" in lines[2]
    assert lines[2].endswith("MISSED")
    assert "4.50x faster than snippet_loop" in lines[3] and lines[3].endswith(" met")
    assert "B=1 L=8" not in format_targets(rows)  # other shapes are not graded
    assert format_targets(rows[-4:]).startswith("targets: not graded")

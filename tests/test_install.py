"""Installing fastnoise: the build record (``fastnoise.build_info()``), the pure-Python mode
(``FASTNOISE_NO_EXT=1``), the refusal of an extension built for another torch, the CUDA
arch check, and the README's quick start kept in step with ``.ci/run``.

The wheel with the compiled extension (its ``torch==`` pin, and ``check`` passing from it in
a fresh venv) is built by ``.ci/run``: it needs the full compile.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import fastnoise
from fastnoise import build
from fastnoise.check import main as check_main

ROOT = Path(__file__).resolve().parents[1]


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("fastnoise_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------
# The quick start: two commands, run by .ci/run as written
# ---------------------------------------------------------------------------------------
def test_readme_quick_start_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2, commands
    ci = re.findall(r"^timed \"[^\"]+\" '([^']+)'$", (ROOT / ".ci" / "run").read_text(), re.M)
    assert ci == commands
    main_job, tests = commands
    assert main_job.endswith("python -m fastnoise check") and "[test]" not in main_job
    assert tests.endswith("python -m pytest -q tests") and '-e ".[test]"' in tests


# ---------------------------------------------------------------------------------------
# CUDA archs: what was built vs the device (issue 21, item 8)
# ---------------------------------------------------------------------------------------
DEFAULT_SASS, DEFAULT_PTX = ["sm_80", "sm_90"], ["compute_90"]


@pytest.mark.parametrize("capability, runs", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),  # sm_80 SASS runs on 8.x, x >= 0
    ((9, 0), True),
    ((10, 0), True), ((12, 0), True), ((12, 1), True),  # compute_90 PTX, JIT by the driver
    ((7, 5), False), ((7, 0), False),  # older than every arch built
])
def test_default_archs_vs_device(capability, runs):
    problem = build.cuda_arch_problem(DEFAULT_SASS, DEFAULT_PTX, capability)
    assert (problem is None) == runs, problem
    if not runs:
        cc = f"{capability[0]}.{capability[1]}"
        assert f"compute capability {cc}" in problem and "no kernel image" in problem
        assert f'TORCH_CUDA_ARCH_LIST="{cc}"' in problem and "sm_80" in problem


@pytest.mark.parametrize("sass, ptx, capability, runs", [
    (["sm_80", "sm_90"], [], (10, 0), False),  # the old default on Blackwell: no kernel image
    (["sm_80", "sm_90"], [], (12, 0), False),
    (["sm_80", "sm_90"], [], (9, 0), True),
    (["sm_86"], [], (8, 0), False),  # SASS runs only on the same major, minor >= its own
    (["sm_86"], [], (8, 9), True),
    (["sm_90a"], [], (9, 0), True),  # arch-specific: that exact capability only
    (["sm_100a"], [], (10, 3), False),
    ([], ["compute_90a"], (10, 0), False),  # arch-specific PTX does not carry forward
    ([], ["compute_80"], (9, 0), True),
    ([], ["compute_100"], (9, 0), False),  # PTX of a newer arch than the device
    ([], [], (9, 0), False),
])
def test_arch_decision(sass, ptx, capability, runs):
    assert (build.cuda_arch_problem(sass, ptx, capability) is None) == runs


@pytest.mark.parametrize("sass, ptx, runs", [(["sm_80", "sm_90"], [], False),
                                             (DEFAULT_SASS, DEFAULT_PTX, True)])
def test_cuda_device_problem_reads_the_record(monkeypatch, sass, ptx, runs):
    """The check the 'cuda' backend makes for its device (no GPU here: the device's answers
    are stood in for), from the archs setup.py recorded; answered once per device."""
    record = {"extension": True, "torch": torch.__version__, "backends_compiled": ["cpu", "cuda"],
              "cuda_sass": sass, "cuda_ptx": ptx}
    queries = []
    monkeypatch.setattr(build, "recorded", lambda: record)
    monkeypatch.setattr(build, "_DEVICE_PROBLEMS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i: queries.append(i) or (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "NVIDIA RTX PRO 6000")
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        problem = build.cuda_device_problem(device)
        assert (problem is None) == runs, problem
    assert queries == [0]
    if not runs:
        assert "NVIDIA RTX PRO 6000 (cuda:0) of compute capability 12.0" in problem


def test_bad_arch_code_is_an_error():
    with pytest.raises(ValueError, match="sm90"):
        build.cuda_arch_problem(["sm90"], [], (9, 0))


def test_setup_default_arch_list_has_ptx(monkeypatch):
    """setup.py's default TORCH_CUDA_ARCH_LIST, through torch's own parser: SASS sm_80 and
    sm_90 plus compute_90 PTX, so that sm_100 / sm_120 can run the kernels."""
    from torch.utils import cpp_extension
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    flags, sass, ptx = _setup_module()._cuda_arch_flags(cpp_extension)
    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    assert (sass, ptx) == (DEFAULT_SASS, DEFAULT_PTX)
    assert "-gencode=arch=compute_90,code=compute_90" in flags
    for capability in [(8, 0), (9, 0), (10, 0), (12, 0)]:
        assert build.cuda_arch_problem(sass, ptx, capability) is None


def test_setup_cuda_build_record(monkeypatch):
    """The CUDA configuration (not compiled here: torch is a CPU build) records its archs,
    nvcc flags and the torch pin; what runs on a GPU machine."""
    from torch.utils import cpp_extension
    setup_mod = _setup_module()
    nvcc = shutil.which("nvcc")
    cuda_home = str(Path(nvcc).resolve().parents[1]) if nvcc else "/nonexistent/cuda"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    for flag in ("FASTNOISE_NO_CUDA", "FASTNOISE_NO_EXT"):
        monkeypatch.delenv(flag, raising=False)
    ext_modules, cmdclass, requires, record = setup_mod._configure()
    assert [e.name for e in ext_modules] == ["fastnoise._C"]
    assert any(s.endswith(".cu") for s in ext_modules[0].sources)
    assert record["backends_compiled"] == ["cpu", "cuda"] and record["missing"] == {}
    assert (record["cuda_sass"], record["cuda_ptx"]) == (DEFAULT_SASS, DEFAULT_PTX)
    assert "-fmad=false" in record["nvcc_flags"]
    assert "-gencode=arch=compute_90,code=compute_90" in record["nvcc_flags"]
    assert record["nvcc_flags"] == ext_modules[0].extra_compile_args["nvcc"]
    if nvcc:
        assert "release" in record["nvcc_version"]
    assert f"torch=={torch.__version__.split('+')[0]}" in requires
    assert set(cmdclass) == {"build_py", "build_ext"}


# ---------------------------------------------------------------------------------------
# The build record of this checkout's build
# ---------------------------------------------------------------------------------------
def test_build_info_describes_this_build(capsys):
    info = fastnoise.build_info()
    if not info["recorded"]:
        assert not info["extension_loaded"], (
            "fastnoise._C loaded but setup.py wrote no build record (fastnoise/_build_info.py)")
        pytest.skip(f"fastnoise is not built here: {build.REBUILD_HINT}")
    assert info["torch_running"] == torch.__version__
    if not info["extension"]:  # a FASTNOISE_NO_EXT install
        assert "FASTNOISE_NO_EXT" in info["missing"]["cpu"] and not info["extension_loaded"]
        return
    assert info["torch"] == torch.__version__ and info["extension_loaded"], info
    assert "cpu" in info["backends_compiled"]
    assert {"-ffp-contract=off", "-fno-fast-math"} <= set(info["cxx_flags"])
    assert info["cxx"] and info["cxx_version"] != "unknown"
    if "cuda" in info["backends_compiled"]:
        assert info["cuda_sass"] and info["cuda_kernels_loaded"]
    else:
        assert info["missing"]["cuda"] and "cuda_sass" not in info
        assert not info["cuda_kernels_loaded"]
        if torch.version.cuda is None:
            assert "CPU-only build" in info["missing"]["cuda"]
    # `check` prints it (and why cuda is absent) before its table
    assert check_main(["--backend", "reference"]) == 0
    out = capsys.readouterr().out
    assert f"build: compiled {', '.join(info['backends_compiled'])}; torch {info['torch']}" in out
    for why in info["missing"].values():
        assert why in out


# ---------------------------------------------------------------------------------------
# Another torch, and the pure-Python mode, in a fresh process over a copy of the package
# ---------------------------------------------------------------------------------------
PROBE = """
import json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastnoise
from fastnoise.backends import available_backends, get_backend
print(json.dumps({
    "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                 if w.category.__module__.startswith("fastnoise")],
    "available_cpu": available_backends("cpu"),
    "reason_cpu": get_backend("cpu").unavailable_reason("cpu"),
    "reason_cuda": get_backend("cuda").unavailable_reason("cuda"),
    "loaded": "fastnoise._C" in sys.modules,
    "info": {k: v for k, v in fastnoise.build_info().items() if isinstance(v, (str, bool))},
}))
"""


def _copy_package(dest: Path, record, with_extension: bool) -> Path:
    """fastnoise's Python files (and this checkout's compiled _C if asked and built) with the
    given build record, under dest."""
    def ignore(folder, names):
        return [n for n in names if n == "__pycache__" or n == "_build_info.py"
                or (n.startswith("_C.") and not with_extension)]
    shutil.copytree(ROOT / "fastnoise", dest / "fastnoise", ignore=ignore)
    (dest / "fastnoise" / "_build_info.py").write_text(f"BUILD_INFO = {record!r}\n")
    return dest


def _probe(path: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": str(path)}
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "undefined symbol" not in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _record(**changes):
    record = build.recorded() or {
        "fastnoise": fastnoise.__version__, "extension": True, "backends_compiled": ["cpu"],
        "missing": {"cuda": "torch is a CPU-only build"}, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda}
    record.update(changes)
    return record


def test_extension_built_for_another_torch_is_refused_in_one_sentence(tmp_path):
    """The copy carries this checkout's real _C (when built) with a record saying another
    torch built it: fastnoise imports, warns once, never loads _C, and the backends say why."""
    other = "2.12.0+cpu"
    path = _copy_package(tmp_path / "pkg", _record(torch=other), with_extension=True)
    got = _probe(path, tmp_path)
    sentence = build.torch_mismatch(_record(torch=other))
    assert sentence.startswith("fastnoise's compiled extension was built for torch 2.12.0+cpu "
                               f"but torch {torch.__version__} is running")
    assert sentence.count(". ") == 0 and sentence.endswith(".")  # one sentence
    assert "install torch==2.12.0" in sentence
    assert got["warnings"] == [f"ExtensionMismatchWarning: {sentence}"]
    assert not got["loaded"]
    assert "cpu" not in got["available_cpu"] and "reference" in got["available_cpu"]
    assert sentence in got["reason_cpu"] and sentence in got["reason_cuda"]
    assert got["info"]["extension_error"] == sentence and not got["info"]["extension_loaded"]


@pytest.mark.parametrize("built, built_cuda, cuda_kernels, running, running_cuda, ok", [
    ("2.13.0+cpu", None, False, "2.13.0+cpu", None, True),
    ("2.13.0+cpu", None, False, "2.13.0+cu130", "13.0", True),  # CPU code, same libtorch
    ("2.13.0+cpu", None, False, "2.14.0+cpu", None, False),
    ("2.13.0+cu130", "13.0", True, "2.13.0+cu130", "13.0", True),
    ("2.13.0+cu130", "13.0", True, "2.13.0+cu129", "12.9", False),  # another CUDA major
    ("2.13.0+cu130", "13.0", True, "2.13.0+cpu", None, False),  # CUDA kernels, CPU torch
    ("2.13.0+cu130", "13.0", True, "2.13.1+cu130", "13.0", False),
])
def test_torch_compatibility_rule(built, built_cuda, cuda_kernels, running, running_cuda, ok):
    record = {"extension": True, "torch": built, "torch_cuda": built_cuda,
              "backends_compiled": ["cpu", "cuda"] if cuda_kernels else ["cpu"]}
    sentence = build.torch_mismatch(record, torch_version=running, torch_cuda=running_cuda)
    assert (sentence is None) == ok, sentence
    if not ok:
        assert built in sentence and running in sentence


def _no_ext_record(monkeypatch):
    monkeypatch.setenv("FASTNOISE_NO_EXT", "1")
    ext_modules, _, requires, record = _setup_module()._configure()
    assert ext_modules == [] and not record["extension"]
    assert not any(r.startswith("torch==") for r in requires)
    return record


@pytest.mark.slow
def test_no_ext_mode_says_why_cpu_and_cuda_are_absent(tmp_path, monkeypatch):
    """The record setup.py writes with FASTNOISE_NO_EXT=1: even with a stale _C beside it
    (an earlier in-place build), nothing compiled is loaded, and each backend says why."""
    record = _no_ext_record(monkeypatch)
    path = _copy_package(tmp_path / "pkg", record, with_extension=True)
    got = _probe(path, tmp_path)
    assert got["warnings"] == [] and not got["loaded"]
    assert got["available_cpu"][0] == "reference" and "cpu" not in got["available_cpu"]
    for reason in (got["reason_cpu"], got["reason_cuda"]):
        assert "FASTNOISE_NO_EXT=1" in reason and "reinstall without FASTNOISE_NO_EXT" in reason
    # `check` says it in words too, and passes on what is there
    env = {**os.environ, "PYTHONPATH": str(path)}
    proc = subprocess.run([sys.executable, "-m", "fastnoise", "check", "--backend", "reference"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "build: compiled nothing" in proc.stdout
    assert re.search(r"^  cpu +not available: .*FASTNOISE_NO_EXT=1", proc.stdout, re.M)
    assert re.search(r"^  cuda +kernels not compiled: .*FASTNOISE_NO_EXT=1", proc.stdout, re.M)


@pytest.mark.slow
def test_no_ext_wheel_is_pure_python_and_unpinned(tmp_path):
    """FASTNOISE_NO_EXT=1 `pip wheel` compiles nothing: a py3-none-any wheel without _C and
    without a torch== pin, whose install has the triton and reference backends only."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(ROOT / "setup.py", src)
    shutil.copytree(ROOT / "fastnoise", src / "fastnoise",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*", "_build_info.py"))
    # an extension left in build/ by an earlier build must not end up in the wheel
    stale = src / "build" / "lib" / "fastnoise"
    stale.mkdir(parents=True)
    (stale / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"stale")
    env = {**os.environ, "FASTNOISE_NO_EXT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastnoise-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        record_text = zf.read("fastnoise/_build_info.py").decode()
    assert not [n for n in names if "/_C." in n or n.endswith(".so")], names
    requires = [ln.split(":", 1)[1].strip() for ln in meta.splitlines()
                if ln.startswith("Requires-Dist:")]
    assert "torch>=2.11" in requires and not any("torch==" in r for r in requires), requires
    assert "'extension': False" in record_text
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(wheel)], check=True, env=env, timeout=300)
    got = _probe(site, tmp_path)
    assert not got["loaded"] and "FASTNOISE_NO_EXT=1" in got["reason_cpu"]
    assert "cpu" not in got["available_cpu"]


@pytest.mark.slow
def test_failing_compile_fails_the_build_loudly(tmp_path):
    """Without FASTNOISE_NO_EXT a C++ error fails `pip wheel` (and so any install) with the
    compiler's message; nothing falls back to a wheel without the extension."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "csrc", src / "csrc")
    shutil.copytree(ROOT / "fastnoise", src / "fastnoise",
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*", "_build_info.py"))
    shutil.copy(ROOT / "setup.py", src)
    for cpp in (src / "csrc").rglob("*.cpp"):  # every C++ file fails at once: no long compile
        cpp.write_text("#error fastnoise test: a broken source\n")
    env = {k: v for k, v in os.environ.items() if k != "FASTNOISE_NO_EXT"}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation",
                           "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "fastnoise test: a broken source" in out
    assert not list((tmp_path / "dist").glob("*.whl"))

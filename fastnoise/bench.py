"""``python -m fastnoise bench``: fastnoise's backends vs what users run today, in one run.

Peers: plain ``F.embedding`` (the limit for the noisy embedding), the Hugging Face NEFTune hook
path (``F.embedding`` then ``out + zeros_like(out).uniform_(-mag, mag)``), the same under
torch.compile, torch-ops Gaussian noise, the torch-ops SymNoise pair (``cat([e + n, e - n])``)
and the NoisyTune snippet loop. The memory-copy bandwidth of the device, measured in the same
run, is the physical limit. Times are medians (``triton.testing.do_bench`` on a GPU; on a CPU
the implementations of one workload are timed round-robin, so that other processes' load
drifts over all of them alike).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .backends import available_backends, resolve_backend, triton_interpreter_enabled
from .functional import noisy_embedding
from .noisytune import noisytune_

GPU_SHAPES = [(8, 2048, 4096, 32000), (4, 4096, 4096, 128256), (16, 512, 2048, 50257),
              (1, 512, 768, 30522)]
CPU_SHAPES = [(8, 512, 1024, 32000), (1, 128, 256, 1000)]
QUICK_CPU_SHAPES = [(1, 128, 256, 1000)]
QUICK_GPU_SHAPES = [(8, 2048, 4096, 32000), (1, 512, 768, 30522)]
MIB = 2**20
#: the peer each workload is judged against first (what users run today)
MAIN_PEERS = ("hf_hook", "torch_pair", "torch_gaussian", "snippet_loop")


@dataclass
class Result:
    workload: str  # e.g. "forward/uniform B=8 L=2048 d=4096 V=32000"
    impl: str  # e.g. "fastnoise[triton]", "F.embedding", "hf_hook"
    ms: float
    bytes_moved: int
    extra_mib: Optional[float]
    gbps: float = 0.0
    pct_copy: float = 0.0
    speedups: Dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _time_ms(fn: Callable, device: torch.device, quick: bool) -> float:
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100,
                              return_mode="median"))
    fn()  # warm-up
    times, budget, start = [], (0.3 if quick else 1.5), time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_ms_interleaved(fns: List[Callable], quick: bool) -> List[float]:
    """Median milliseconds of each fn on a CPU, timed round-robin (one call of each per
    round), so that load from other processes drifts over all of them alike."""
    for fn in fns:
        fn()  # warm-up
    times: List[List[float]] = [[] for _ in fns]
    budget = (0.3 if quick else 1.5) * len(fns)
    start = time.perf_counter()
    while len(times[0]) < 3 or (time.perf_counter() - start < budget and len(times[0]) < 50):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(ts) for ts in times]


def _extra_mib(fn: Callable, device: torch.device) -> Optional[float]:
    """Peak memory of one call beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak / MIB


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = 256 * MIB  # far larger than any cache
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, quick)
    return 2 * n / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# Peers: what users run today
# --------------------------------------------------------------------------------------
def hf_neftune_hook(ids, weight, alpha):
    """transformers' integrations/neftune.py: noise on every position, L = padded length."""
    out = F.embedding(ids, weight)
    mag = alpha / math.sqrt(out.size(1) * out.size(2))
    return out + torch.zeros_like(out).uniform_(-mag, mag)


def torch_gaussian(ids, weight, alpha):
    out = F.embedding(ids, weight)
    return out + torch.randn_like(out) * (alpha / math.sqrt(out.size(1) * out.size(2)))


def torch_symnoise_pair(ids, weight, alpha):
    e = F.embedding(ids, weight)
    mag = alpha / math.sqrt(e.size(1) * e.size(2))
    n = (torch.randint_like(e, 0, 2) * 2 - 1) * mag
    return torch.cat([e + n, e - n])


@torch.no_grad()
def noisytune_snippet(params, lam=0.15):
    """The NoisyTune paper's loop."""
    for p in params:
        p.add_((torch.rand_like(p) - 0.5) * lam * torch.std(p))


def llama_like_shapes(device: torch.device):
    """A Llama-1B-like parameter set on a GPU (~0.85 B params, 147 tensors), small on a CPU."""
    if device.type == "cuda":
        vocab, hidden, inter, kv, layers = 32000, 2048, 5632, 512, 16
    else:
        vocab, hidden, inter, kv, layers = 1000, 128, 352, 32, 4
    shapes = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                   (inter, hidden), (inter, hidden), (hidden, inter), (hidden,), (hidden,)]
    return shapes + [(hidden,), (vocab, hidden)]


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------
def fast_backends(device: torch.device, dtype) -> List[str]:
    names = [n for n in available_backends(device, dtype) if n != "reference"]
    if device.type == "cpu" and triton_interpreter_enabled():
        names = [n for n in names if n != "triton"]  # the interpreter is a test tool
    return names + ["reference"] if device.type == "cpu" else names


def results_dtype(device: torch.device) -> torch.dtype:
    """The weight dtype the bench uses by default: bf16 on a GPU, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def run_bench(device, quick=False, shapes=None, dtype=None, compile_peers=True,
              progress: Optional[Callable[[str], None]] = None) -> List[Result]:
    device = torch.device(device)
    dtype = dtype or results_dtype(device)
    if shapes is None:
        shapes = {("cuda", False): GPU_SHAPES, ("cuda", True): QUICK_GPU_SHAPES,
                  ("cpu", False): CPU_SHAPES, ("cpu", True): QUICK_CPU_SHAPES}[
                      (device.type, quick)]
    say = progress or (lambda msg: None)
    say("copy bandwidth")
    copy_gbps = copy_bandwidth(device, quick)
    elt = torch.tensor([], dtype=dtype).element_size()
    backends = fast_backends(device, dtype)
    results: List[Result] = []

    pending = []  # CPU: measured together by flush(), interleaved

    def measure(workload, impl, fn, nbytes):
        if device.type != "cuda":
            pending.append((workload, impl, fn, nbytes))
            return
        say(f"{workload}: {impl}")
        ms = _time_ms(fn, device, quick)
        extra = _extra_mib(fn, device)
        results.append(Result(workload, impl, ms, nbytes, extra))

    def flush():
        """Times the pending CPU measurements, one workload at a time, round-robin."""
        for workload in dict.fromkeys(p[0] for p in pending):
            group = [p for p in pending if p[0] == workload]
            say(f"{workload}: " + ", ".join(p[1] for p in group))
            for (_, impl, _, nbytes), ms in zip(group, _time_ms_interleaved(
                    [p[2] for p in group], quick)):
                results.append(Result(workload, impl, ms, nbytes, None))
        pending.clear()

    compiled_hook = torch.compile(hf_neftune_hook) if compile_peers else None
    compiled_pair = torch.compile(torch_symnoise_pair) if compile_peers else None
    alpha = 5.0
    for batch, length, d, vocab in shapes:
        shape = f"B={batch} L={length} d={d} V={vocab}"
        weight = torch.randn(vocab, d, device=device, dtype=dtype)
        ids = torch.randint(0, vocab, (batch, length), device=device)
        one = batch * length * d * elt  # one pass over the output
        fwd = f"forward/uniform {shape}"
        measure(fwd, "F.embedding", lambda: F.embedding(ids, weight), 2 * one)
        measure(fwd, "hf_hook", lambda: hf_neftune_hook(ids, weight, alpha), 2 * one)
        if compiled_hook is not None:
            measure(fwd, "hf_hook+compile", lambda: compiled_hook(ids, weight, alpha), 2 * one)
        for name in backends:
            measure(fwd, f"fastnoise[{name}]",
                    lambda name=name: noisy_embedding(ids, weight, alpha=alpha, backend=name),
                    2 * one)
        gauss = f"forward/gaussian {shape}"
        measure(gauss, "F.embedding", lambda: F.embedding(ids, weight), 2 * one)
        measure(gauss, "torch_gaussian", lambda: torch_gaussian(ids, weight, alpha), 2 * one)
        for name in backends:
            measure(gauss, f"fastnoise[{name}]",
                    lambda name=name: noisy_embedding(ids, weight, noise="gaussian",
                                                      alpha=alpha, backend=name), 2 * one)
        sign = f"forward/bernoulli {shape}"
        measure(sign, "F.embedding", lambda: F.embedding(ids, weight), 2 * one)
        for name in backends:
            measure(sign, f"fastnoise[{name}]",
                    lambda name=name: noisy_embedding(ids, weight, noise="bernoulli",
                                                      alpha=alpha, backend=name), 2 * one)
        pair = f"symmetric pair {shape}"
        measure(pair, "F.embedding", lambda: F.embedding(ids, weight), 2 * one)
        measure(pair, "torch_pair", lambda: torch_symnoise_pair(ids, weight, alpha), 3 * one)
        if compiled_pair is not None:
            measure(pair, "torch_pair+compile", lambda: compiled_pair(ids, weight, alpha),
                    3 * one)
        for name in backends:
            measure(pair, f"fastnoise[{name}]",
                    lambda name=name: noisy_embedding(ids, weight, noise="bernoulli",
                                                      symmetric=True, alpha=alpha, backend=name),
                    3 * one)
        # forward + backward: the dense weight gradient dominates the bytes
        wgrad = weight.clone().requires_grad_()
        grad = torch.randn(batch, length, d, device=device, dtype=dtype)
        fb = f"forward+backward {shape}"
        fb_bytes = 4 * one + vocab * d * elt

        def hf_step():
            wgrad.grad = None
            hf_neftune_hook(ids, wgrad, alpha).backward(grad)

        measure(fb, "hf_hook", hf_step, fb_bytes)
        for name in backends:
            def step(name=name):
                wgrad.grad = None
                noisy_embedding(ids, wgrad, alpha=alpha, backend=name).backward(grad)
            measure(fb, f"fastnoise[{name}]", step, fb_bytes)
        flush()
        del wgrad, grad, weight

    params = [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in llama_like_shapes(device)]
    total = sum(p.numel() for p in params)
    nt = f"noisytune {total / 1e6:.0f}M params, {len(params)} tensors"
    measure(nt, "snippet_loop", lambda: noisytune_snippet(params), 3 * total * elt)
    for name in backends:
        measure(nt, f"fastnoise[{name}]", lambda name=name: noisytune_(params, 0.15, backend=name),
                3 * total * elt)
    flush()

    _derive(results, copy_gbps)
    return results, copy_gbps


def _derive(results: List[Result], copy_gbps: float) -> None:
    by_workload: Dict[str, Dict[str, Result]] = {}
    for r in results:
        r.gbps = r.bytes_moved / (r.ms * 1e-3) / 1e9
        r.pct_copy = 100 * r.gbps / copy_gbps
        by_workload.setdefault(r.workload, {})[r.impl] = r
    for group in by_workload.values():
        peers = {k: v for k, v in group.items() if not k.startswith("fastnoise")}
        for r in group.values():
            if r.impl.startswith("fastnoise"):
                r.speedups = {k: p.ms / r.ms for k, p in peers.items()}


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def format_table(results: List[Result]) -> str:
    lines = [f"{'workload':44s} {'impl':22s} {'ms':>9s} {'GB/s':>8s} {'%copy':>6s} "
             f"{'+MiB':>7s}  speedup vs peers"]
    for r in results:
        extra = "-" if r.extra_mib is None else f"{r.extra_mib:.1f}"
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in r.speedups.items())
        lines.append(f"{r.workload:44s} {r.impl:22s} {r.ms:9.4f} {r.gbps:8.1f} "
                     f"{r.pct_copy:6.1f} {extra:>7s}  {speed}")
    return "\n".join(lines)


#: The CPU targets of issue 15, for fastnoise[cpu] at TARGET_SHAPE (at small shapes the
#: Python op layer's fixed cost dominates): (workload prefix, peer, bound, kind); "at_most":
#: fastnoise time <= bound x peer time, "faster": peer time >= bound x fastnoise time.
TARGET_SHAPE = "B=8 L=512 d=1024 V=32000"
CPU_TARGETS = [
    ("forward/bernoulli", "F.embedding", 1.5, "at_most"),
    ("symmetric pair", "F.embedding", 2.0, "at_most"),
    ("forward/uniform", "F.embedding", 2.5, "at_most"),
    ("forward/gaussian", "F.embedding", 5.0, "at_most"),
    ("forward/gaussian", "torch_gaussian", 2.0, "faster"),
    ("noisytune", "snippet_loop", 3.0, "faster"),
]


def format_targets(results: List[Result], impl: str = "fastnoise[cpu]") -> str:
    """The CPU targets (CPU_TARGETS) against the peers measured in the same run, graded only
    at TARGET_SHAPE, the shape they are for (NoisyTune: its one parameter set)."""
    if not any(TARGET_SHAPE in r.workload for r in results):
        return (f"targets: not graded (they are for {TARGET_SHAPE}, which this run did not "
                "time; run without --quick)")
    lines = [f"targets ({impl} vs peers of the same run at {TARGET_SHAPE}; time ratio = "
             "fastnoise ms / peer ms):"]
    for prefix, peer, bound, kind in CPU_TARGETS:
        for r in results:
            if r.impl != impl or not r.workload.startswith(prefix) or peer not in r.speedups:
                continue
            if not r.workload.startswith("noisytune") and TARGET_SHAPE not in r.workload:
                continue
            speedup = r.speedups[peer]  # peer ms / fastnoise ms
            if kind == "at_most":
                ratio, met = 1.0 / speedup, 1.0 / speedup <= bound
                what = f"{ratio:5.2f}x the time of {peer} (target <= {bound}x)"
            else:
                met = speedup >= bound
                what = f"{speedup:5.2f}x faster than {peer} (target >= {bound}x)"
            lines.append(f"  {r.workload:44s} {what:52s} {'met' if met else 'MISSED'}")
    return "\n".join(lines)


def op_of(workload: str) -> str:
    """The op a workload times (forward + backward is where the backward's pick shows)."""
    if workload.startswith("forward+backward"):
        return "backward"
    return "noisytune" if workload.startswith("noisytune") else "forward"


def format_auto_picks(results: List[Result], device, dtype) -> str:
    """Per workload: the fastest backend measured and what "auto" picks for that op, so the
    AUTO_ORDER table can follow the numbers."""
    lines = ["auto's pick per op vs the fastest backend measured (a forward+backward row runs "
             "both ops on the backend it names):"]
    for workload in dict.fromkeys(r.workload for r in results):
        mine = {r.impl[len("fastnoise["):-1]: r for r in results
                if r.workload == workload and r.impl.startswith("fastnoise[")}
        if not mine:
            continue
        op = op_of(workload)
        best = min(mine.values(), key=lambda r: r.ms)
        pick = resolve_backend("auto", device, dtype, op=op).name
        note = (f"auto ({op}) picks {pick}" if pick not in mine else
                f"auto ({op}) picks {pick}: " + ("the fastest" if mine[pick] is best else
                                                 f"{mine[pick].ms / best.ms:.2f}x the fastest"))
        lines.append(f"{workload:44s} fastest {best.impl:22s} {note}")
    return "\n".join(lines)


def write_csv(results: List[Result], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["workload", "impl", "ms", "bytes", "gbps", "pct_copy", "extra_mib",
                         "speedups"])
        for r in results:
            writer.writerow([r.workload, r.impl, f"{r.ms:.6f}", r.bytes_moved, f"{r.gbps:.2f}",
                             f"{r.pct_copy:.2f}", "" if r.extra_mib is None else
                             f"{r.extra_mib:.2f}",
                             ";".join(f"{k}={v:.3f}" for k, v in r.speedups.items())])


def write_plot(results: List[Result], path: str, title: str) -> None:
    """One panel per workload: each implementation's time (log axis, so fast and slow bars
    both show), fastnoise's bars in red, the peers in blue, plain F.embedding in grey, the
    copy-bandwidth floor as a dashed line, and each bar labelled with its time and, for
    fastnoise, its ratio to what users run today."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in results))
    cols = 3
    rows = (len(workloads) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.6 * rows), squeeze=False,
                             constrained_layout=True)
    for ax, workload in zip(axes.flat, workloads):
        group = [r for r in results if r.workload == workload]
        names = [r.impl for r in group]
        times = [r.ms for r in group]
        colors = ["tab:red" if n.startswith("fastnoise") else
                  "tab:gray" if n == "F.embedding" else "tab:blue" for n in names]
        ys = range(len(group))
        ax.barh(ys, times, color=colors)
        ax.set_xscale("log")
        ax.set_yticks(list(ys))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        floor = min((r.ms * r.pct_copy / 100 for r in group if r.pct_copy > 0), default=None)
        if floor:
            ax.axvline(floor, color="k", ls="--", lw=0.8)
            ax.text(floor, len(group) - 0.55, " copy floor", fontsize=6, va="bottom")
        for y, r in zip(ys, group):
            peer = next((k for k in MAIN_PEERS if k in r.speedups), None)
            label = f" {r.ms:.3g} ms"
            if peer is not None:
                label += f"  ({r.speedups[peer]:.2g}x faster than {peer})"
            ax.text(r.ms, y, label, va="center", fontsize=6)
        ax.set_xlim(min(times + ([floor] if floor else [])) / 2, max(times) * 30)
        ax.set_title(workload, fontsize=8)
        ax.set_xlabel("ms per call (log scale, shorter is faster)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(workloads):]:
        ax.axis("off")
    fig.suptitle(title + "  (red: fastnoise, blue: what users run today, grey: F.embedding)",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastnoise bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--convergence", action="store_true",
                        help="train a tiny Llama over seeds with no noise, the stock hook and "
                             "fastnoise's methods; loss curves, CSV (resumes), PNG and TOST "
                             "(fastnoise/bench_convergence.py), instead of the kernels")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile peers (they take a while to compile)")
    parser.add_argument("--csv", help="write every measurement to this CSV file")
    parser.add_argument("--plot", help="write a PNG plot of bandwidth and speedups")
    parser.add_argument("--e2e", action="store_true",
                        help="time one training step of a Llama-like model per method, stock "
                             "hook vs fastnoise (fastnoise/bench_e2e.py), instead of the kernels")
    parser.add_argument("--overhead", action="store_true",
                        help="time the host cost of a call on tiny tensors against F.embedding, "
                             "nn.Embedding and the HF hook (fastnoise/bench_overhead.py)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"fastnoise bench on {name}, torch {torch.__version__}, "
              f"{time.strftime('%Y-%m-%d')}")
    print(header, flush=True)
    if args.convergence:
        from .bench_convergence import main as run_convergence
        return run_convergence(args, device, header)
    if args.e2e:
        from .bench_e2e import main as run_e2e
        return run_e2e(args, device, header)
    if args.overhead:
        from .bench_overhead import main as run_overhead
        return run_overhead(args, device, header)
    step = [0]

    def progress(msg):
        step[0] += 1
        print(f"  [{step[0]:3d}] {msg}", file=sys.stderr, flush=True)

    results, copy_gbps = run_bench(device, quick=args.quick,
                                   compile_peers=not (args.no_compile or
                                                      (args.quick and device.type == "cpu")),
                                   progress=progress)
    print(f"copy bandwidth: {copy_gbps:.1f} GB/s (bytes read + written)")
    print(format_table(results))
    print(format_auto_picks(results, device, results_dtype(device)))
    if device.type == "cpu":
        print(format_targets(results))
    if args.csv:
        write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(results, args.plot, header)
        print(f"wrote {args.plot}")
    return 0

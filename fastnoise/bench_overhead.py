"""``python -m fastnoise bench --overhead``: the host cost of a call, against its plain peers.

On a GPU the host time of a call is paid before its kernel starts; at LoRA-sized shapes it is
the whole cost. Here the tensors are tiny (ids (1, 8), weight (100, 16)), so only the host side
counts. Each group's calls are timed in interleaved rounds (every call of the group once per
round, ``CALLS`` times in a row), and each call's time is the median over the rounds of its
per-call mean, so that load from other processes drifts over a group alike. The ratios are to
the plain peer of the same group, measured in the same rounds:

* ``functional``: ``fastnoise.noisy_embedding(ids, w)`` vs ``F.embedding(ids, w)``;
* ``module``: a ``NoisyEmbedding`` in training, forward + backward, vs ``nn.Embedding`` (its
  weight with grad) and the Hugging Face hook on it (three unfused ops);
* ``mask`` / ``position_ids`` / ``cu_seqlens``: the per-token scale, vs ``F.embedding``;
* ``symmetric``: the SymNoise pair, vs ``F.embedding`` and the torch-ops pair;
* ``small, one core busy``: a (1, 128) x 256 call while another process keeps one core busy
  (an OpenMP region opened for small work waits for the busy core), vs the hook's ops.

On a GPU the same groups run with CUDA tensors, plus the call as a user makes it (a module in
training, forward + backward) at host-bound shapes, timed with ``do_bench``.
"""

from __future__ import annotations

import math
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .functional import noisy_embedding
from .modules import NoisyEmbedding

ALPHA = 5.0
CALLS = 100  # calls of one function in a row, per round
#: (group, peer, bound): fastnoise's time <= bound x the peer's (the targets of issue #20)
TARGETS = [
    ("functional", "F.embedding", 2.0),
    ("module (train, fwd+bwd)", "nn.Embedding", 1.5),
    ("attention_mask", "F.embedding", 3.0),
    ("position_ids", "F.embedding", 3.0),
    ("cu_seqlens", "F.embedding", 3.0),
    ("small, one core busy", "hf_hook", 1.0),
]
#: host-bound shapes of the GPU rows (B, L, d, V): LoRA / small-model fine-tuning
GPU_SHAPES = [(1, 512, 768, 30522), (16, 512, 2048, 50257)]


@dataclass
class Row:
    group: str
    impl: str
    us: float  # microseconds per call (median over rounds)
    ratios: Dict[str, float]  # this impl's time / the peer's


def hf_hook(output: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """transformers' integrations/neftune.py forward hook: three unfused ops."""
    mag = alpha / math.sqrt(output.size(1) * output.size(2))
    return output + torch.zeros_like(output).uniform_(-mag, mag)


def torch_pair(e: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    mag = alpha / math.sqrt(e.size(1) * e.size(2))
    n = (torch.randint_like(e, 0, 2) * 2 - 1) * mag
    return torch.cat([e + n, e - n])


def time_interleaved(fns: List[Callable], rounds: int, calls: int = CALLS) -> List[float]:
    """Microseconds per call of each fn: the median over rounds of the mean of ``calls``
    calls in a row; one round runs every fn once, in turn."""
    for fn in fns:
        for _ in range(20):
            fn()  # warm-up (first-call caches, allocator)
    per_round: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, seen in zip(fns, per_round):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            seen.append((time.perf_counter() - t0) / calls * 1e6)
    return [statistics.median(seen) for seen in per_round]


def _busy(stop) -> None:
    while not stop.is_set():
        pass


def cpu_groups(small_dtype=torch.float32) -> List[Tuple[str, Dict[str, Callable], bool]]:
    """(group, {impl: fn}, needs a busy core) of the CPU host-cost table."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (1, 8))
    w = torch.randn(100, 16)
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 6:] = 0
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    grad = torch.randn(1, 8, 16)

    plain = nn.Embedding(100, 16).train()
    hooked = nn.Embedding(100, 16).train()
    hooked.register_forward_hook(lambda module, args, out: hf_hook(out))
    noisy = NoisyEmbedding(100, 16, alpha=ALPHA).train()

    def step(module):
        def fn():
            module.weight.grad = None
            module(ids).backward(grad)
        return fn

    big_ids = torch.randint(0, 1000, (1, 128))
    big_w = torch.randn(1000, 256, dtype=small_dtype)
    return [
        ("functional", {"F.embedding": lambda: F.embedding(ids, w),
                        "hf_hook": lambda: hf_hook(F.embedding(ids, w)),
                        "fastnoise": lambda: noisy_embedding(ids, w, alpha=ALPHA)}, False),
        ("module (train, fwd+bwd)", {"nn.Embedding": step(plain), "hf_hook": step(hooked),
                                     "fastnoise": step(noisy)}, False),
        ("attention_mask", {"F.embedding": lambda: F.embedding(ids, w),
                            "fastnoise": lambda: noisy_embedding(ids, w, attention_mask=mask)},
         False),
        ("position_ids", {"F.embedding": lambda: F.embedding(ids, w),
                          "fastnoise": lambda: noisy_embedding(ids, w, position_ids=pos)}, False),
        ("cu_seqlens", {"F.embedding": lambda: F.embedding(ids, w),
                        "fastnoise": lambda: noisy_embedding(ids, w, cu_seqlens=cu)}, False),
        ("symmetric", {"F.embedding": lambda: F.embedding(ids, w),
                       "torch_pair": lambda: torch_pair(F.embedding(ids, w)),
                       "fastnoise": lambda: noisy_embedding(ids, w, noise="bernoulli",
                                                            symmetric=True)}, False),
        ("small, one core busy", {"hf_hook": lambda: hf_hook(F.embedding(big_ids, big_w)),
                                  "fastnoise": lambda: noisy_embedding(big_ids, big_w)}, True),
    ]


def run_cpu(rounds: int = 15, progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    rows: List[Row] = []
    for group, fns, busy in cpu_groups():
        if progress:
            progress(group)
        stop = proc = None
        if busy:
            ctx = multiprocessing.get_context("fork")
            stop = ctx.Event()
            proc = ctx.Process(target=_busy, args=(stop,), daemon=True)
            proc.start()
            time.sleep(0.2)
        try:
            times = time_interleaved(list(fns.values()), rounds)
        finally:
            if proc is not None:
                stop.set()
                proc.join()
        by_impl = dict(zip(fns, times))
        for impl, us in by_impl.items():
            ratios = {} if impl != "fastnoise" else {
                peer: us / peer_us for peer, peer_us in by_impl.items() if peer != impl}
            rows.append(Row(group, impl, us, ratios))
    return rows


def run_gpu(device: torch.device, progress=None) -> List[Row]:
    """The call as a user makes it at host-bound shapes (module in training, forward +
    backward), every available GPU backend, against nn.Embedding and the hook."""
    from triton.testing import do_bench

    from .backends import available_backends

    rows: List[Row] = []
    for batch, length, d, vocab in GPU_SHAPES:
        group = f"module fwd+bwd B={batch} L={length} d={d} V={vocab} bf16"
        if progress:
            progress(group)
        ids = torch.randint(0, vocab, (batch, length), device=device)
        grad = torch.randn(batch, length, d, device=device, dtype=torch.bfloat16)
        modules = {"nn.Embedding": nn.Embedding(vocab, d), "hf_hook": nn.Embedding(vocab, d)}
        modules["hf_hook"].register_forward_hook(lambda module, args, out: hf_hook(out))
        for name in available_backends(device, torch.bfloat16):
            if name != "reference":
                modules[f"fastnoise[{name}]"] = NoisyEmbedding(vocab, d, backend=name)
        times = {}
        for impl, module in modules.items():
            module.to(device=device, dtype=torch.bfloat16).train()

            def fn(module=module):
                module.weight.grad = None
                module(ids).backward(grad)
            times[impl] = float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e3
        for impl, us in times.items():
            ratios = {} if not impl.startswith("fastnoise") else {
                peer: us / times[peer] for peer in ("nn.Embedding", "hf_hook")}
            rows.append(Row(group, impl, us, ratios))
    return rows


def format_rows(rows: List[Row]) -> str:
    lines = [f"{'group':28s} {'impl':22s} {'us/call':>9s}  time ratio vs peers"]
    for r in rows:
        ratios = ", ".join(f"{peer} {v:.2f}x" for peer, v in r.ratios.items())
        lines.append(f"{r.group:28s} {r.impl:22s} {r.us:9.2f}  {ratios}")
    return "\n".join(lines)


def format_targets(rows: List[Row]) -> str:
    lines = ["targets (fastnoise's host time / the peer's, same run):"]
    for group, peer, bound in TARGETS:
        for r in rows:
            if r.group == group and r.impl == "fastnoise" and peer in r.ratios:
                ratio = r.ratios[peer]
                lines.append(f"  {group:28s} {ratio:5.2f}x {peer:14s} (target <= {bound}x)  "
                             f"{'met' if ratio <= bound else 'MISSED'}")
    return "\n".join(lines)


def main(args, device: torch.device, header: str) -> int:
    step = [0]

    def progress(msg):
        step[0] += 1
        print(f"  [{step[0]:2d}] {msg}", flush=True)

    torch.set_num_threads(torch.get_num_threads())
    rows = run_cpu(rounds=7 if args.quick else 15, progress=progress)
    print(f"host cost per call, CPU tensors ({torch.get_num_threads()} threads)")
    print(format_rows(rows))
    print(format_targets(rows))
    print("triton: not timed on the CPU (the Triton interpreter is a test tool, not a launcher)")
    if device.type == "cuda":
        gpu_rows = run_gpu(device, progress)
        print("call as a user makes it on the GPU (do_bench medians)")
        print(format_rows(gpu_rows))
    return 0

"""``python -m fastnoise bench --e2e``: one training step of a Llama-like model.

One step is forward, backward and an AdamW step of a ``transformers`` Llama built from a
config (no download), for each method, with the noise the way users add it today vs
``fastnoise.patch``:

- neftune: transformers' own NEFTune hook (``activate_neftune``, what
  ``neftune_noise_alpha`` runs) vs fastnoise;
- gaussian: a forward hook in the same style with ``randn_like`` noise vs fastnoise;
- symnoise: a forward hook returning the torch-ops pair ``cat([e + n, e - n])`` with the
  labels doubled by hand vs fastnoise (which doubles them itself);
- the unpatched model (no noise; ``impl`` ``F.embedding``, as in the kernel bench) is the limit.

Each variant runs in its own process (so one's allocations do not count in another's peak);
all are alive at once and timed in interleaved rounds. Time is the median step in
milliseconds; peak memory is, on a GPU, the peak allocated during
the measured steps beyond what was allocated before them, and on the CPU the growth of the
process's peak resident set over its size before the first step (so it includes the AdamW
state, the same for every variant). Rows use the kernel bench's ``Result``, table, CSV and plot
(``bytes`` is 0: a whole step has no single byte count, so the bandwidth columns are 0).
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

from . import bench

METHODS = ("neftune", "gaussian", "symnoise")
#: the stock-style peer of each method, named as in the kernel bench
PEERS = {"neftune": "hf_hook", "gaussian": "torch_gaussian", "symnoise": "torch_pair"}
ALPHA = 5.0


def sizes(device: torch.device, quick: bool) -> dict:
    """A Llama-like model and batch per device: ~1 B-class shapes cut to 4 layers on a GPU,
    a small model on a CPU."""
    if device.type == "cuda":
        model = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                     num_hidden_layers=2 if quick else 4, num_attention_heads=16,
                     num_key_value_heads=4)
        return dict(model=model, batch=4 if quick else 8, length=1024, dtype="bfloat16")
    model = dict(vocab_size=8000, hidden_size=256, intermediate_size=688,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return dict(model=model, batch=4, length=128 if quick else 256, dtype="float32")


def _stock_hook(method: str, alpha: float):
    """The stock-style forward hooks for Gaussian noise and the SymNoise pair (NEFTune uses
    transformers' own hook)."""
    def hook(module, args, output):
        if not module.training:
            return output
        if method == "gaussian":
            return bench.torch_gaussian(args[0], module.weight, alpha).to(output.dtype)
        return bench.torch_symnoise_pair(args[0], module.weight, alpha).to(output.dtype)
    return hook


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _build_step(device: torch.device, size: dict, method: Optional[str], impl: str):
    """(step function, model) of one variant (``impl`` "fastnoise", a peer name, or "F.embedding"
    with ``method`` None), on a model of ``size`` (see :func:`sizes`)."""
    import transformers

    import fastnoise

    dtype = getattr(torch, size["dtype"])
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=size["length"], **size["model"])
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()
    ids = torch.randint(0, config.vocab_size, (size["batch"], size["length"]), device=device)
    labels = ids
    if method is not None and impl == "fastnoise":
        fastnoise.patch(model, method, ALPHA)
    elif method == "neftune":
        from transformers.integrations.neftune import activate_neftune
        activate_neftune(model, ALPHA)  # what Trainer runs for neftune_noise_alpha
    elif method is not None:
        model.get_input_embeddings().register_forward_hook(_stock_hook(method, ALPHA))
        if method == "symnoise":
            labels = torch.cat([ids, ids])  # the stock pair doubles only the embeddings
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()

    return step, model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _serve(conn, device: str, quick: bool, method: Optional[str], impl: str) -> None:
    """One variant in its own process: builds, reports the first step's peak memory, then
    times ``n`` steps per request (mean ms) until told to stop."""
    device = torch.device(device)
    step, _ = _build_step(device, sizes(device, quick), method, impl)
    _sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = _rss_bytes()
    step()
    _sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else _peak_rss_bytes()) - base
    conn.send(peak / bench.MIB)
    while True:
        n = conn.recv()
        if n is None:
            return
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            step()
        _sync(device)
        conn.send((time.perf_counter() - start) * 1e3 / n)


def variants():
    """(workload method, impl, method to run) in table order."""
    rows = []
    for method in METHODS:
        rows.append((method, "F.embedding", None))
        rows.append((method, PEERS[method], method))
        rows.append((method, "fastnoise", method))
    return rows


def run_e2e(device, quick: bool = False,
            progress: Optional[Callable[[str], None]] = None) -> List[bench.Result]:
    """Every variant in its own process, all alive at once and timed in interleaved rounds
    (one step each per round on the CPU, 5 on a GPU), so load drift hits them alike; the
    median round per variant is reported."""
    device = torch.device(device)
    size = sizes(device, quick)
    m = size["model"]
    shape = (f"B={size['batch']} L={size['length']} d={m['hidden_size']} "
             f"V={m['vocab_size']} layers={m['num_hidden_layers']} {size['dtype']}")
    backend = bench.resolve_backend("auto", device, getattr(torch, size["dtype"])).name
    say = progress or (lambda msg: None)
    context = multiprocessing.get_context("spawn")
    keys = list(dict.fromkeys((impl, run) for _, impl, run in variants()))
    workers, peaks = {}, {}
    try:
        for impl, run in keys:
            say(f"train step: {impl} {run or ''}")
            ours, theirs = context.Pipe()
            proc = context.Process(target=_serve, args=(theirs, str(device), quick, run, impl),
                                   daemon=True)
            proc.start()
            workers[(impl, run)] = (proc, ours)
            peaks[(impl, run)] = ours.recv()  # built and stepped once before the next starts
        rounds, per_round = (5 if quick else 20), (5 if device.type == "cuda" else 1)
        times = {key: [] for key in keys}
        for r in range(rounds):
            say(f"round {r + 1}/{rounds}")
            for key in keys:
                workers[key][1].send(per_round)
                times[key].append(workers[key][1].recv())
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    results = []
    for method, impl, run in variants():
        name = f"fastnoise[{backend}]" if impl == "fastnoise" else impl
        results.append(bench.Result(f"train step/{method} {shape}", name,
                                    statistics.median(times[(impl, run)]), 0,
                                    peaks[(impl, run)]))
    bench._derive(results, copy_gbps=math.inf)
    return results


def main(args, device: torch.device, header: str) -> int:
    """The ``--e2e`` branch of ``python -m fastnoise bench`` (its parsed ``args``)."""
    def progress(msg):
        print(f"  {msg}", file=sys.stderr, flush=True)

    results = run_e2e(device, quick=args.quick, progress=progress)
    print("one training step (forward, backward, AdamW); +MiB = peak memory of the step "
          "(GPU: allocated; CPU: resident set growth); "
          f"{torch.get_num_threads()} CPU threads per process (OMP_NUM_THREADS)")
    print(bench.format_table(results))
    if args.csv:
        bench.write_csv(results, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        bench.write_plot(results, args.plot, header + " (training step)")
        print(f"wrote {args.plot}")
    return 0

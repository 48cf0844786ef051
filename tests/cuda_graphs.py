"""CUDA-graph capture for the GPU tests (one harness for every backend's replay test)."""

import torch


def capture(fn):
    """Warm ``fn`` up on a side stream (kernels compile, the allocator settles), then capture
    one call of it into a CUDA graph. Returns (graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def replay(graph, read, times=2):
    """Replay ``graph`` ``times`` times; after each, ``read()`` (clone what it returns)."""
    seen = []
    for _ in range(times):
        graph.replay()
        torch.cuda.synchronize()
        seen.append(read())
    return seen

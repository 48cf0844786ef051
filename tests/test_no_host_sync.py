"""No host sync on the hot path: a forward or backward never reads input-derived tensor data
back to the host (on a GPU each read is a device sync that stalls the launch queue), and
never builds a tensor from host data (``torch.tensor(list, device=...)`` is a blocking copy
on a GPU, and illegal under CUDA graph capture).

On the CPU a ``TorchFunctionMode`` follows every tensor derived from the call's inputs and
fails on any read of one (a mode is off while its handler runs an op, so the Python backends'
op bodies, ``ops.python_forward`` / ``ops.python_backward``, are run under it again) (``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``nonzero``,
``unique``, ...). The one read allowed is fastnoise's own error buffer (:mod:`fastnoise.errors`:
on CUDA it is an asynchronous copy to pinned memory), and the Triton interpreter's own host
copies (it emulates the GPU on the host). On a GPU the same calls run under
``torch.cuda.set_sync_debug_mode("error")``.
"""

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import fastnoise
from fastnoise import errors

_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
    torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero,
    torch.Tensor.unique, torch.unique, torch.unique_consecutive, torch.Tensor.numpy,
    torch.Tensor.__array__, torch.masked_select, torch.Tensor.masked_select, torch.argwhere,
}


#: tensors made from host data: on a GPU a blocking host-to-device copy
_HOST_BUILT = {torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor,
               torch.from_numpy, torch.Tensor.new_tensor}


@pytest.fixture(autouse=True)
def _track_inside_python_ops(monkeypatch):
    """Inside a custom op the mode that saw the op is off: turn the active tracker on again
    around the bodies of fastnoise's Python ops."""
    from fastnoise import ops

    def tracked(body):
        def run(*args, **kwargs):
            if SyncTracker.active is None:
                return body(*args, **kwargs)
            with SyncTracker.active:
                return body(*args, **kwargs)
        return run

    monkeypatch.setattr(ops, "python_forward", tracked(ops.python_forward))
    monkeypatch.setattr(ops, "python_backward", tracked(ops.python_backward))


class SyncTracker(TorchFunctionMode):
    """Fails on a host read of a tensor derived from the tracked inputs, and on any tensor
    built from host data while it is active."""

    active = None  # the tracker of the running test

    def __init__(self, *inputs):
        super().__init__()
        self.keep, self.tainted = [], set()
        for t in inputs:
            self._taint(t)

    def __enter__(self):
        SyncTracker.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        SyncTracker.active = None
        return super().__exit__(*exc)

    def _taint(self, value):
        for leaf in tree_flatten(value)[0]:
            if isinstance(leaf, torch.Tensor) and id(leaf) not in self.tainted:
                self.keep.append(leaf)  # hold it: ids stay unique while tracked
                self.tainted.add(id(leaf))

    def _is_tainted(self, value):
        return any(isinstance(leaf, torch.Tensor) and id(leaf) in self.tainted
                   for leaf in tree_flatten(value)[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tainted = self._is_tainted((args, kwargs))
        if tainted and func in _READS and not self._allowed(args):
            raise AssertionError(f"host read of input-derived data: {func.__name__}")
        if func in _HOST_BUILT and not self._allowed(()):
            raise AssertionError(f"tensor built from host data: {func.__name__}")
        out = func(*args, **kwargs)
        if tainted:
            self._taint(out)
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.startswith("__") and args:
                self._taint(args[0])  # in place: the mutated tensor now holds input data
            if "out" in kwargs:
                self._taint(kwargs["out"])
        return out

    @staticmethod
    def _allowed(args):
        buffers = {id(state.buffer) for state in errors._STATES.values()}
        if args and id(args[0]) in buffers:
            return True
        frame = sys._getframe(2)
        while frame is not None:  # the Triton interpreter emulates the device on the host
            if "/triton/" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False


BACKENDS = [b for b in fastnoise.available_backends("cpu", torch.float32) if b != "reference"]


def _cases():
    for noise in fastnoise.NOISE_KINDS:
        for symmetric in (False, True):
            yield dict(noise=noise, symmetric=symmetric)
    yield dict(attention_mask=True)
    yield dict(position_ids=True, padding_idx=3)
    yield dict(cu_seqlens=True, embed_scale=2.0, symmetric=True)
    yield dict(attention_mask=True, position_ids=True, noise="gaussian")


def _call(case, backend, batch=2, length=5, vocab=20, d=12):
    weight = torch.randn(vocab, d, requires_grad=True)
    ids = torch.randint(0, vocab, (batch, length))
    kwargs = dict(case)
    if kwargs.pop("attention_mask", False):
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, -2:] = 0
        kwargs["attention_mask"] = mask
    if kwargs.pop("position_ids", False):
        pos = torch.arange(length).repeat(batch, 1)
        pos[1, 2:] -= 2
        kwargs["position_ids"] = pos
    if kwargs.pop("cu_seqlens", False):
        kwargs["cu_seqlens"] = torch.tensor([0, 3, 3, batch * length])
    return weight, ids, kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cases()), ids=str)
def test_functional_forward_backward_reads_nothing_back(backend, case):
    weight, ids, kwargs = _call(case, backend)
    with SyncTracker(weight, ids, *kwargs.values()) as tracker:
        out = fastnoise.noisy_embedding(ids, weight, backend=backend, **kwargs)
        grad = torch.randn_like(out)
        tracker._taint(grad)
        out.backward(grad)
    assert weight.grad is not None and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_cases()), ids=str)
def test_module_forward_backward_reads_nothing_back(backend, case):
    weight, ids, kwargs = _call(case, backend)
    emb = fastnoise.NoisyEmbedding(weight.shape[0], weight.shape[1],
                                   padding_idx=kwargs.pop("padding_idx", None),
                                   noise=kwargs.pop("noise", "uniform"),
                                   symmetric=kwargs.pop("symmetric", False), backend=backend,
                                   embed_scale=kwargs.pop("embed_scale", 1.0))
    with SyncTracker(emb.weight, ids, *kwargs.values()):
        out = emb(ids, **kwargs)
        out.float().pow(2).sum().backward()
    assert emb.weight.grad is not None


def test_the_tracker_catches_a_read():
    ids = torch.tensor([1, 2])
    with pytest.raises(AssertionError, match="host read"):
        with SyncTracker(ids):
            (ids + 1).max().item()
    with pytest.raises(AssertionError, match="host read"):
        with SyncTracker(ids):
            bool((ids > 0).all())
    with SyncTracker(ids):  # an unrelated tensor may be read (e.g. a drawn seed)
        int(torch.randint(0, 5, ()))
    for build in (lambda: torch.tensor([1, 0, 3, 0]), lambda: torch.as_tensor([2.0]),
                  lambda: torch.scalar_tensor(2.0), lambda: ids.new_tensor([1])):
        with pytest.raises(AssertionError, match="built from host data"):
            with SyncTracker(ids):
                build()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_scaled_embedding_builds_no_tensor(backend):
    """A scaled embedding (Gemma) in eval mode: the scale is a float rounded to the dtype,
    never a tensor made per call."""
    emb = fastnoise.NoisyEmbedding(20, 12, embed_scale=2.5, backend=backend).eval()
    ids = torch.randint(0, 20, (2, 5))
    with SyncTracker(emb.weight, ids):
        out = emb(ids)
    assert torch.equal(out, torch.nn.functional.embedding(ids, emb.weight) * 2.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("case", list(_cases()), ids=str)
def test_gpu_forward_backward_never_syncs(backend, case):
    if backend not in fastnoise.available_backends("cuda"):
        pytest.skip(f"{backend} not available")
    weight, ids, kwargs = _call(case, backend)
    weight = weight.detach().cuda().requires_grad_()
    ids = ids.cuda()
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    fastnoise.noisy_embedding(ids, weight, backend=backend, **kwargs).sum().backward()  # warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fastnoise.noisy_embedding(ids, weight, backend=backend, **kwargs)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fastnoise.check_errors()

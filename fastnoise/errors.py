"""Errors found on the device, reported without a host sync on the hot path.

A forward cannot check its ids (or packing boundaries) on the host without reading them back,
one device sync per call. So the kernels check them: an out-of-range id gets a NaN output row
(never an out-of-bounds read) and is recorded in a small per-device int64 buffer (contract C1 of
:mod:`fastnoise.reference`: ``[code, value, bound, 0]``, code 1 = bad token id); invalid
``cu_seqlens`` / negative ``position_ids`` (codes 2 and 3) make the per-token scale NaN and are
recorded by the op that computes the scale (inside the C++ op; with device-side tensor ops for
the Python backends).

When the error surfaces:

* CPU tensors: at once, inside the call that met it (the C++ CPU kernels raise themselves;
  the buffer of the Triton interpreter and of the packing check is read right after the call:
  on the CPU that is no device sync).
* CUDA tensors: after each call an asynchronous copy of the buffer to pinned host memory is
  queued with an event. Every later fastnoise call on that device (forward or backward) first
  looks at the copies whose events have completed (``event.query()``: never waits) and raises
  there. In a training loop that is the next call: by then the faulty kernel has finished.
  :func:`check_errors` waits for the pending copies and raises: call it where a guarantee is
  needed (after a step, in a test). Inside a CUDA graph capture nothing is copied; the buffer
  keeps the record (it is sticky until reported) and the next eager call or
  :func:`check_errors` reads it.

The error is raised once; the buffer is then cleared.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

__all__ = ["DeviceError", "BadTokenIdError", "BadPackingError", "check_errors", "error_buffer",
           "after_call", "poll", "record_invalid_packing", "add_buffer_listener"]

#: codes of error[0]
BAD_ID, BAD_CU_SEQLENS, BAD_POSITION_IDS = 1, 2, 3


class DeviceError(Exception):
    """An error found on the device by an earlier (or this) fastnoise call."""


class BadTokenIdError(DeviceError, IndexError):
    """A token id out of [0, num_embeddings)."""


class BadPackingError(DeviceError, ValueError):
    """Invalid ``cu_seqlens`` or negative ``position_ids``."""


def _message(code: int, value: int, bound: int, where: str) -> str:
    if code == BAD_ID:
        return (f"token id {value} is out of range [0, {bound}) ({where}; "
                "the output rows of the bad ids were written as NaN)")
    if code == BAD_CU_SEQLENS:
        return (f"cu_seqlens must rise from 0 to input.numel() = {bound} without going down "
                f"({where}; the noise of that call was NaN)")
    if code == BAD_POSITION_IDS:
        return f"position_ids must be >= 0 ({where}; the noise of that call was NaN)"
    return f"unknown device error code {code} ({where})"


class _DeviceState:
    """The error buffer of one device and the asynchronous copies of it (CUDA)."""

    def __init__(self, device: torch.device):
        if device.type == "cuda":
            with torch.cuda.device(device):
                capturing = torch.cuda.is_current_stream_capturing()
            if capturing:
                # torch.zeros would be recorded into the graph and never run eagerly: later
                # checks would read garbage and every replay would clear eager records
                raise RuntimeError(
                    f"fastnoise: the first fastnoise call on {device} is inside a CUDA graph "
                    "capture; make one call (or build the NoisyEmbedding / patch the model "
                    "with its weight on that device) before capturing")
        self.device = device
        self.buffer = torch.zeros(4, dtype=torch.int64, device=device)
        # a CPU buffer is read through a NumPy view: ~0.1 us, where .tolist() takes ~1 us
        self.host_view = _numpy_view(self.buffer) if device.type == "cpu" else None
        # (pinned host copy, event) of each call whose copy has not been looked at yet
        self.pending: List[tuple] = []
        # copies queued before an error was reported: ignored, and reused once complete
        self.retired: List[tuple] = []
        self.spare: List[tuple] = []
        for listener in _LISTENERS:
            listener(self.buffer)

    def take_spare(self):
        """A (pinned host buffer, event) pair no copy is in flight into."""
        if self.retired:
            in_flight = []
            for entry in self.retired:
                (self.spare if entry[1].query() else in_flight).append(entry)
            self.retired = in_flight
        if self.spare:
            return self.spare.pop()
        return torch.empty(4, dtype=torch.int64, pin_memory=True), torch.cuda.Event()


def _numpy_view(buffer: torch.Tensor):
    try:
        return buffer.numpy()
    except Exception:  # torch without NumPy: read the tensor itself
        return buffer


_STATES: Dict[torch.device, _DeviceState] = {}
#: called with each new device buffer (fastnoise.extension registers it with the C++ ops)
_LISTENERS: List = []


def add_buffer_listener(listener) -> None:
    """Call ``listener(buffer)`` for every error buffer, made or to be made."""
    _LISTENERS.append(listener)
    for state in _STATES.values():
        listener(state.buffer)


def _state(device: torch.device) -> _DeviceState:
    state = _STATES.get(device)
    if state is None:
        if device.type == "cuda" and device.index is None:
            return _state(torch.device("cuda", torch.cuda.current_device()))
        state = _STATES[device] = _DeviceState(device)
    return state


def error_buffer(device: torch.device) -> torch.Tensor:
    """The int64 (4,) error buffer of ``device`` that the kernels record into, made on first
    use, which must be outside a CUDA graph capture (the modules and patch make it when
    they settle their calls)."""
    return _state(device).buffer


def _raise_from(state: _DeviceState, values, where: str) -> None:
    """Raise the error in ``values`` (a copy of the buffer), once.

    What is guaranteed: an error is raised once, by the first check that sees it. After the
    report the device buffer is zeroed, ordered on the current stream, and the copies still
    in flight (queued before the report) are retired: their values are never read and their
    host buffers are reused only once their copy has completed. Kernels on another stream
    that record an error while the buffer is being zeroed may lose that record; fastnoise's
    own calls of one training step run on one stream."""
    code, value, bound = int(values[0]), int(values[1]), int(values[2])
    if code == 0:
        return
    state.buffer.zero_()
    state.retired.extend(state.pending)
    state.pending = []
    kind = BadTokenIdError if code == BAD_ID else BadPackingError
    raise kind(_message(code, value, bound, where))


def after_call(device: torch.device) -> None:
    """After a call's kernels are queued: CPU, report at once; CUDA, queue the async copy."""
    state = _state(device)
    if state.host_view is not None:
        if state.host_view[0]:
            _raise_from(state, state.buffer.tolist(), "found in this call")
        return
    if torch.cuda.is_current_stream_capturing():
        return  # the buffer keeps the record for the next eager call / check_errors()
    host, event = state.take_spare()
    with torch.cuda.device(state.device):
        host.copy_(state.buffer, non_blocking=True)
        event.record()
    state.pending.append((host, event))


def poll(device: torch.device) -> None:
    """Raise an error recorded by an earlier call whose kernels have finished; never waits."""
    state = _STATES.get(device)
    if state is None or not state.pending or torch.cuda.is_current_stream_capturing():
        return
    done = 0
    for host, event in state.pending:
        if not event.query():
            break
        done += 1
    if not done:
        return
    finished, state.pending = state.pending[:done], state.pending[done:]
    last = finished[-1][0]  # the buffer is sticky: the newest finished copy holds all
    values = last.tolist()
    state.spare.extend(finished)
    _raise_from(state, values, "found by the kernel of an earlier fastnoise call on "
                f"{state.device}")


def check_errors(device: Optional[torch.device] = None) -> None:
    """Wait for the kernels of earlier fastnoise calls on ``device`` (default: every device
    used) and raise the first error they recorded (bad token ids, invalid packing inputs)."""
    states = [_STATES[d] for d in list(_STATES)] if device is None else (
        [_state(torch.device(device))])
    for state in states:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
            state.spare.extend(state.pending + state.retired)
            state.pending, state.retired = [], []
        _raise_from(state, state.buffer.tolist(), f"found on {state.device}")


def record_invalid_packing(device: torch.device, valid: torch.Tensor, code: int,
                           bound: int) -> None:
    """Record ``code`` in the device's buffer where the 0-d bool ``valid`` is False, with
    device-side ops only (no host sync, nothing copied from the host: the scalars are
    kernel arguments); an earlier record is kept. The C++ ops record inside the op."""
    buffer = _state(device).buffer
    fresh = (~valid.to(buffer.device)) & (buffer[0] == 0)
    update = torch.zeros_like(buffer)
    update[0] = code
    update[2] = bound
    buffer.copy_(torch.where(fresh, update, buffer))

"""Errors found on the device, reported without a host sync on the hot path.

A forward cannot check its ids (or packing boundaries) on the host without reading them back,
one device sync per call. So the kernels check them: an out-of-range id gets a NaN output row
(never an out-of-bounds read) and is recorded in a small per-device int64 buffer (contract C1:
``[code, value, bound, 0]``, code 1 = bad token id); invalid ``cu_seqlens`` / negative
``position_ids`` are recorded by the op layer with device-side tensor ops (codes 2 and 3) and
make the per-token scale NaN.

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
           "after_call", "poll", "record_invalid_packing"]

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
    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = torch.zeros(4, dtype=torch.int64, device=device)
        # (pinned host copy, event) of each call whose copy has not been looked at yet
        self.pending: List[tuple] = []
        self.spare: List[tuple] = []


_STATES: Dict[torch.device, _DeviceState] = {}


def _state(device: torch.device) -> _DeviceState:
    state = _STATES.get(device)
    if state is None:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
            return _state(device)
        state = _STATES[device] = _DeviceState(device)
    return state


def error_buffer(device: torch.device) -> torch.Tensor:
    """The int64 (4,) error buffer of ``device`` that the kernels record into."""
    return _state(device).buffer


def _raise_from(state: _DeviceState, values, where: str) -> None:
    code, value, bound = int(values[0]), int(values[1]), int(values[2])
    if code == 0:
        return
    state.buffer.zero_()  # reported once
    for host, _ in state.pending:
        host.zero_()
    state.pending.clear()
    kind = BadTokenIdError if code == BAD_ID else BadPackingError
    raise kind(_message(code, value, bound, where))


def after_call(device: torch.device) -> None:
    """After a call's kernels are queued: CPU, report at once; CUDA, queue the async copy."""
    state = _state(device)
    if state.device.type != "cuda":
        _raise_from(state, state.buffer.tolist(), "found in this call")
        return
    if torch.cuda.is_current_stream_capturing():
        return  # the buffer keeps the record for the next eager call / check_errors()
    host, event = state.spare.pop() if state.spare else (
        torch.empty(4, dtype=torch.int64, pin_memory=True), torch.cuda.Event())
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
    state.spare.extend(finished)
    _raise_from(state, last.tolist(), "found by the kernel of an earlier fastnoise call on "
                f"{state.device}")


def check_errors(device: Optional[torch.device] = None) -> None:
    """Wait for the kernels of earlier fastnoise calls on ``device`` (default: every device
    used) and raise the first error they recorded (bad token ids, invalid packing inputs)."""
    states = [_STATES[d] for d in list(_STATES)] if device is None else (
        [_state(torch.device(device))])
    for state in states:
        if state.device.type == "cuda":
            torch.cuda.synchronize(state.device)
            state.spare.extend(state.pending)
            state.pending = []
        _raise_from(state, state.buffer.tolist(), f"found on {state.device}")


def record_invalid_packing(device: torch.device, valid: torch.Tensor, code: int,
                           bound: int) -> None:
    """Record ``code`` in the device's buffer where the 0-d bool ``valid`` is False, with
    device-side ops only (no host sync); an earlier record is kept."""
    buffer = _state(device).buffer
    fresh = (~valid.to(buffer.device)) & (buffer[0] == 0)
    update = torch.tensor([code, 0, bound, 0], dtype=torch.int64, device=buffer.device)
    buffer.copy_(torch.where(fresh, update, buffer))

"""Execution lanes: where the pipeline's two stages run.

On CUDA the text stage (encode) and the acoustic stage (render) each get a stream; a stage
hands its result over by recording an event that the other stream waits on, so the host never
calls synchronize() in the loop. On CPU the stages run in two threads and the hand-over is the
thread join itself, so events are no-ops.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol


class Lanes(Protocol):
    def encode(self) -> AbstractContextManager[Any]:
        """Context in which the text stage runs."""

    def render(self) -> AbstractContextManager[Any]:
        """Context in which the acoustic stage runs."""

    def mark(self) -> Any:
        """Record the work queued so far on the current lane; returns a token for `wait`."""

    def wait(self, token: Any) -> None:
        """Make the current lane wait (device-side) for the work behind `token`."""


class CpuLanes:
    def encode(self) -> AbstractContextManager[None]:
        return nullcontext()

    def render(self) -> AbstractContextManager[None]:
        return nullcontext()

    def mark(self) -> None:
        return None

    def wait(self, token: Any) -> None:
        return None


class CudaLanes:
    """Two streams on one device. Render has the higher priority: it feeds the listener."""

    def __init__(self, device: Any) -> None:
        import torch

        self._torch = torch
        self.encode_stream = torch.cuda.Stream(device=device, priority=0)
        self.render_stream = torch.cuda.Stream(device=device, priority=-1)

    def encode(self) -> AbstractContextManager[Any]:
        return self._torch.cuda.stream(self.encode_stream)

    def render(self) -> AbstractContextManager[Any]:
        return self._torch.cuda.stream(self.render_stream)

    def mark(self) -> Any:
        event = self._torch.cuda.Event()
        event.record()  # on the current stream of this thread
        return event

    def wait(self, token: Any) -> None:
        if token is not None:
            self._torch.cuda.current_stream().wait_event(token)

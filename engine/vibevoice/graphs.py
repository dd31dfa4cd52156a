"""CUDA graphs of the batched decode step (batch.py), one per bucket of slots.

A decode step is ~4,000 small kernels; eagerly the CPU cannot launch them as fast as an H100
runs them, so the step is captured once per bucket size and replayed. The rules followed:
- capture after a warm-up on a side stream (lazy cuBLAS/cuDNN set-up must not be captured);
- largest bucket first, all graphs in one memory pool (nano-vllm): a smaller graph's
  temporaries fit in what the largest one reserved. Sharing a pool is safe only because
  the graphs are replayed one at a time, in one thread, on one stream (PyTorch's rule);
- every input and output is a preallocated buffer the step reads and writes in place, so a
  replay needs no argument copies; what differs between steps (noise, tokens, states) is
  already in those buffers.
CPU-only machines never construct this (batch.py checks `device.type == "cuda"`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class StepGraphs:
    """`step(b)` captured for every b in `buckets`; `replay(b)` runs it on the current stream.

    `step` must be safe to run for real during the warm-up (batch.py captures with every slot
    inactive, when a step writes only its outputs and the KV scratch column).
    """

    def __init__(
        self, step: Callable[[int], None], buckets: Sequence[int], device: torch.device
    ) -> None:
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        for b in sorted(buckets, reverse=True):
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for _ in range(2):
                    step(b)
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                step(b)
            if pool is None:
                pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize(device)

    def replay(self, b: int) -> None:
        self.graphs[b].replay()

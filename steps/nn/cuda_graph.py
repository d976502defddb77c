"""Replaying a fixed sequence of GPU steps from CUDA graphs, so that the host no longer launches every kernel.

A loop of many small kernels (the cached sampler launches about a hundred per code-map position, each a few
microseconds of GPU work) is bound by the host: Python and the dispatcher spend tens of microseconds per launch while
the GPU idles. A CUDA graph records the kernels a step launches, with their arguments and memory addresses, once;
replaying it launches all of them with one call. Replay is exact: the same kernels run on the same addresses.

``torch.compile(mode="reduce-overhead")`` would capture graphs too, but it first traces and compiles the step, and a
sampler's step is unrolled over every position (the attention reads a prefix that grows with the position): tracing
a 32x32 map means tracing ~100k operations, minutes of compile time, and every new batch size recompiles. Capturing
the eager operations directly costs about one eager pass, and the kernels are the eager ones, so graph and eager
results are identical bit for bit.

What a captured step may do (the rules of :func:`torch.cuda.graph`):

* no host synchronisation (``.item()``, ``int(t)``, printing a tensor, ``torch.nonzero``) and no Python decision on
  tensor values: the host only records, nothing runs during capture;
* every tensor that outlives a step (inputs, outputs, state carried to the next step) must be allocated before
  capture and updated in place; temporaries a step allocates come from the graphs' private memory pool and are
  valid only inside the step.

Each step is captured as its own graph; all graphs share one memory pool, which is legal because they always replay
in capture order, one after the other, on one stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


class GraphSequence:
    """``steps`` captured as CUDA graphs, one per step, replayed in order by :meth:`replay`.

    Args:
        steps: callables without arguments that only launch GPU work on preallocated tensors (see the module
            docstring). They are called once each, during capture; nothing they launch runs until :meth:`replay`.
        warm_up: run once eagerly before capture, on the stream that then captures: it must launch the same kinds of
            kernels as the steps, so that lazy initialisation (cuBLAS handles and workspaces, cuDNN plans, lazily
            loaded kernels) happens outside capture, where it is allowed to synchronise and allocate.
        device: the CUDA device the steps run on.

    Attributes:
        warm_up_seconds: wall seconds of the warm-up.
        capture_seconds: wall seconds of capturing and instantiating every graph.
    """

    def __init__(self, steps: Sequence[Callable[[], None]], warm_up: Callable[[], None], device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        with torch.cuda.device(device):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                warm_up()
            stream.synchronize()
            self.warm_up_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            pool = torch.cuda.graph_pool_handle()
            self.graphs: list[torch.cuda.CUDAGraph] = []
            for step in steps:
                graph = torch.cuda.CUDAGraph()
                # thread_local: other threads of the process (e.g. a Ray actor's) may keep using CUDA meanwhile.
                with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                    step()
                self.graphs.append(graph)
            torch.cuda.synchronize()
            self.capture_seconds = time.perf_counter() - t0
        self.device = device

    def replay(self) -> None:
        """Launch every captured step, in order, on the current stream (asynchronously, like eager launches)."""
        with torch.cuda.device(self.device):
            for graph in self.graphs:
                graph.replay()

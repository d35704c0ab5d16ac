"""Whole sampler steps replayed from CUDA graphs: the score call and the sampler's update of
every step, captured once at a fixed batch shape and replayed for every later batch.

A step of a few-millisecond network on a fast GPU spends a real share of its time launching
kernels from Python: the network's hundreds, then the sampler's elementwise updates, the PDS
FFTs and the noise. A CUDA graph launches all of a step's kernels at once.

The samplers know nothing of this. `StepGraphSampler` wraps a sampler function and keeps its
signature. The first batch of a shape runs eagerly (it warms up cuDNN, cuBLAS and cuFFT, whose
first calls cannot be captured). On the second, the sampler runs once under capture: its
`callback`, which every sampler calls at the end of each step, closes one graph and opens the
next, so graph i holds step i (graph 0 also the prior's draw, the last one whatever follows the
last step). Nothing computes during capture; the graphs are then replayed, for this batch and
every later one: the per-batch inputs are only the sample indices, which the captured noise
(`pdscli.noise.SampleNoise`, device-side counters) reads from a buffer `rebind` refills.
After each graph the caller's callback sees that step's tensors, as in an eager run.

Where capture is impossible the sampler runs eagerly and `info` says why: a CPU device, a batch
whose shape differs from the captured one (the last, partial batch of a run), or a sampler that
reads a tensor on the host inside a step (accel-ode's per-sample NaN guard does), which a
capture refuses.

The step grid's coefficients are Python floats baked into the graphs, and the sampler's
control flow is recorded as it ran: so a capture is only replayed for the same sampler, score,
grid, preconditioner and options, and captured anew when they change.

`CompiledStepSampler` is the other way to the same end: the whole sampler call goes through
`torch.compile(mode="reduce-overhead")`. Dynamo traces score call and update together; its graph
breaks fall where a step touches the host (the grid's sigma read as a float, the callback), so the
compiled regions are about one step each, and Inductor replays each region from a CUDA graph
(its own graph trees, with their own warm-up). It needs no capture by hand and survives a
host read inside a step (the region just ends there), at the price of a compile on the first
batch. Where it cannot run (a CPU for CUDA graphs, no Triton, a compiler error) the batch runs
eagerly and `info` says why, as for the graph path. `step_sampler` picks one of the paths.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from typing import Callable

import torch

from pdscli.errors import first_line
from pdscli.noise import SampleNoise

EAGER, CUDA_GRAPH, COMPILED = "eager", "cuda-graph", "compile"
STEP_PATHS = ("off", CUDA_GRAPH, COMPILED)  # what a caller may ask for


class _Capture:
    """The graphs of one captured sampler call and what replaying them needs."""

    def __init__(self, key, noise: SampleNoise):
        self.key = key
        self.noise = noise  # the captured noise: its buffers are the graphs' inputs
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.infos: list[dict] = []  # the callback's view of each step (its tensors: buffers graph i fills)
        self.calls: list[int] = []  # score calls made by the end of each graph
        self.out: torch.Tensor | None = None


class StepGraphSampler:
    """`sampler_fn` with its steps captured in CUDA graphs where possible; same call signature.

    `info` records the path the last batch took and, for eager, why; `batches` counts batches
    per path; `summary()` is what a run records. `enabled=False` always runs eagerly (the path
    a user asked for).
    """

    def __init__(self, sampler_fn, device, *, enabled: bool = True):
        self.fn = sampler_fn
        self.device = torch.device(device)
        self.enabled = enabled
        self.capture: _Capture | None = None
        self.warm_key = None
        self.failed: tuple | None = None  # (key, reason) of a setting whose capture failed
        self.info: dict = {"path": EAGER, "reason": "no batch run yet"}  # the last batch's
        self.eager_reason: str | None = None
        self.batches = {EAGER: 0, CUDA_GRAPH: 0}

    # -- the sampler signature ------------------------------------------------------------------

    def __call__(self, score, noise, steps, *, callback=None, **opts):
        # `opts`: the sampler's own keywords (pdscli.samplers.sampler_kwargs), passed through unchanged.
        reason = self._eager_reason(noise)
        key = self._key(score, noise, steps, opts)
        if reason is None and self.failed is not None and self.failed[0] == key:
            reason = self.failed[1]
        if reason is None and key != self.warm_key:
            self.warm_key = key
            reason = "first batch of this shape and setting: eager warm-up before capture"
        if reason is not None:
            return self._eager(reason, score, noise, steps, opts, callback)
        if self.capture is None or self.capture.key != key:
            try:
                self.capture = self._capture(key, score, noise, steps, opts)
            except Exception as e:  # the capture is abandoned; this setting runs eagerly from now on
                self.capture, self.failed = None, (key, f"capture failed ({type(e).__name__}: {first_line(e)})")
                return self._eager(self.failed[1], score, noise, steps, opts, callback)
        return self._replay(score, noise, callback)

    def summary(self) -> dict:
        """For run.json and bench: `path` cuda-graph if any batch replayed graphs, else eager;
        `reason`: why the last eager batch was eager (the warm-up, a partial batch, ...);
        `batches` per path."""
        path = CUDA_GRAPH if self.batches[CUDA_GRAPH] else EAGER
        return {"path": path, "reason": self.eager_reason, "batches": dict(self.batches)}

    # -- paths --------------------------------------------------------------------------------

    def _eager_reason(self, noise) -> str | None:
        if not self.enabled:
            return "step graphs off"
        if self.device.type != "cuda":
            return f"CUDA graphs need a CUDA device (this run is on {self.device.type})"
        if not isinstance(noise, SampleNoise):
            return "the noise is not a pdscli.noise.SampleNoise (its draws cannot be replayed)"
        if self.capture is not None and (len(noise), noise.shape) != (len(self.capture.noise), self.capture.noise.shape):
            return f"batch of {len(noise)}: the graphs were captured for {len(self.capture.noise)} (fixed shapes)"
        return None

    @staticmethod
    def _key(score, noise, steps, opts) -> tuple:
        # The preconditioner by identity (its filters are tensors); the other keywords by value.
        given = tuple(sorted((k, id(v) if k == "precond" else repr(v)) for k, v in opts.items()))
        return (id(score), getattr(noise, "seed", None), len(noise), getattr(noise, "shape", None), id(steps), given)

    def _eager(self, reason, score, noise, steps, opts, callback):
        self.info = {"path": EAGER, "reason": reason}
        self.eager_reason = reason
        self.batches[EAGER] += 1
        return self.fn(score, noise, steps, callback=callback, **opts)

    def _capture(self, key, score, noise: SampleNoise, steps, opts) -> _Capture:
        cap = _Capture(key, SampleNoise(noise.seed, noise.indices, noise.shape, self.device))
        pool = torch.cuda.graph_pool_handle()  # one pool: the graphs replay in capture order
        calls0 = getattr(score, "calls", 0)

        buffers: dict[str, torch.Tensor] = {}

        def boundary(info: dict) -> None:
            # The step's tensors are copied (inside graph i) into buffers that outlive the capture:
            # holding every step's own tensors instead would keep n steps of state in memory.
            shown = {}
            for name, value in info.items():
                if isinstance(value, torch.Tensor):
                    if name not in buffers:
                        buffers[name] = torch.empty_like(value)
                    buffers[name].copy_(value)
                    value = buffers[name]
                shown[name] = value
            cap.graphs[-1].capture_end()
            cap.infos.append(shown)
            cap.calls.append(getattr(score, "calls", 0) - calls0)
            cap.graphs.append(torch.cuda.CUDAGraph())
            cap.graphs[-1].capture_begin(pool=pool)

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.stream(side):
                cap.graphs.append(torch.cuda.CUDAGraph())
                cap.graphs[-1].capture_begin(pool=pool)
                try:
                    cap.out = self.fn(score, cap.noise, steps, callback=boundary, **opts)
                except BaseException:  # Ctrl-C too: a stream left capturing would break every later CUDA call
                    # End the broken capture, but report what broke it, not the end's own error.
                    with contextlib.suppress(Exception):
                        cap.graphs[-1].capture_end()
                    raise
                cap.graphs[-1].capture_end()
            cap.calls.append(getattr(score, "calls", 0) - calls0)
        finally:
            torch.cuda.current_stream(self.device).wait_stream(side)
            if hasattr(score, "calls"):
                score.calls = calls0  # nothing was computed: the replays count the calls
        return cap

    def _replay(self, score, noise: SampleNoise, callback):
        cap = self.capture
        cap.noise.rebind(noise.indices)
        calls0 = getattr(score, "calls", None)
        for i, graph in enumerate(cap.graphs):
            graph.replay()
            if calls0 is not None:
                score.calls = calls0 + cap.calls[i]
            if i < len(cap.infos) and callback is not None:
                callback(cap.infos[i])
        self.info = {"path": CUDA_GRAPH, "reason": None, "graphs": len(cap.graphs)}
        self.batches[CUDA_GRAPH] += 1
        return cap.out.clone()  # the next replay overwrites the captured output


class CompiledStepSampler:
    """`sampler_fn` through `torch.compile(mode=mode, backend=backend)`; same call signature.

    The defaults are the GPU variant: Inductor with CUDA-graph replay ("reduce-overhead"), which
    needs a CUDA device. Another `mode` or `backend` (say backend="eager", Dynamo's tracing
    alone) runs on any device. The first batch compiles (`compile_s` in `summary()`); a batch of
    another size runs eagerly rather than compiling again for one partial batch. `info`,
    `batches` and `summary()` are as for `StepGraphSampler`.
    """

    def __init__(self, sampler_fn, device, *, enabled: bool = True, mode: str | None = "reduce-overhead",
                 backend: str | Callable = "inductor"):
        self.fn = sampler_fn
        self.device = torch.device(device)
        self.enabled, self.mode, self.backend = enabled, mode, backend
        self.compiled = None
        self.batch_shape: tuple | None = None  # (batch, shape) of the first compiled batch
        self.failed: str | None = None  # why compiling failed: every later batch runs eagerly
        self.compile_s: float | None = None
        self.graph_counts: dict | None = None  # Dynamo's graphs and graph breaks of the first batch
        self.info: dict = {"path": EAGER, "reason": "no batch run yet"}
        self.eager_reason: str | None = None
        self.batches = {EAGER: 0, COMPILED: 0}

    def __call__(self, score, noise, steps, *, callback=None, **opts):
        reason = self._eager_reason(noise)
        if reason is not None:
            return self._eager(reason, score, noise, steps, opts, callback)
        first = self.compiled is None
        if first:
            self.compiled = torch.compile(self.fn, mode=self.mode, backend=self.backend, dynamic=False)
            self.batch_shape = (len(noise), tuple(getattr(noise, "shape", ())))
        before = _dynamo_counts() if first else None
        calls0 = getattr(score, "calls", None)
        t0 = time.perf_counter()
        try:
            if self.device.type == "cuda":
                # A new sampler call: outputs of earlier replays may be overwritten from here on.
                torch.compiler.cudagraph_mark_step_begin()
            x = self.compiled(score, noise, steps, callback=callback, **opts)
        except torch._dynamo.exc.TorchDynamoException as e:  # a compiler problem, not the sampler's own error
            self.failed = f"compile failed ({_innermost(e)})"
            if calls0 is not None:
                score.calls = calls0  # the batch is made again eagerly: count its calls once
            if isinstance(noise, SampleNoise):
                noise.rebind(noise.indices)  # the failed attempt may have drawn: start the batch's noise over
            return self._eager(self.failed, score, noise, steps, opts, callback)
        if first:
            self.compile_s = time.perf_counter() - t0
            self.graph_counts = {k: v - before[k] for k, v in _dynamo_counts().items()}
        self.info = {"path": COMPILED, "reason": None}
        self.batches[COMPILED] += 1
        return x.clone()  # a replay may write into the graph's output buffer again

    def summary(self) -> dict:
        """As `StepGraphSampler.summary`, plus the mode, the backend and the first batch's compile
        time and Dynamo graph counts."""
        path = COMPILED if self.batches[COMPILED] else EAGER
        return {"path": path, "reason": self.eager_reason, "batches": dict(self.batches), "mode": self.mode,
                "backend": self.backend, "compile_s": self.compile_s, "graphs": self.graph_counts}

    def _eager_reason(self, noise) -> str | None:
        if not self.enabled:
            return "compiled steps off"
        if self.failed is not None:
            return self.failed
        if self.mode == "reduce-overhead" and self.backend == "inductor":
            if self.device.type != "cuda":
                return f"torch.compile(mode=\"reduce-overhead\") replays CUDA graphs: it needs a CUDA device " \
                       f"(this run is on {self.device.type})"
            if importlib.util.find_spec("triton") is None:
                return "torch.compile on CUDA needs Triton (not installed)"
        if self.batch_shape is not None and (len(noise), tuple(getattr(noise, "shape", ()))) != self.batch_shape:
            return f"batch of {len(noise)}: compiled for {self.batch_shape[0]} (fixed shapes)"
        return None

    def _eager(self, reason, score, noise, steps, opts, callback):
        self.info = {"path": EAGER, "reason": reason}
        self.eager_reason = reason
        self.batches[EAGER] += 1
        return self.fn(score, noise, steps, callback=callback, **opts)


def _innermost(e: BaseException) -> str:
    """The error a compiler wrapper reports: the wrapped one (Dynamo's own first line is only
    "backend='inductor' raised:"), as "Type: first line"."""
    while (inner := e.__cause__ or getattr(e, "inner_exception", None)) is not None:
        e = inner
    return f"{type(e).__name__}: {first_line(e)}"


def _dynamo_counts() -> dict:
    """Dynamo's running totals (process-wide, so read as differences): graphs compiled, graph
    breaks, and the graphs Inductor left without CUDA-graph replay (an input mutated in place, a
    CPU tensor: reduce-overhead then gains nothing there)."""
    counters = torch._dynamo.utils.counters
    return {"graphs": int(counters["stats"].get("unique_graphs", 0)), "graph_breaks": int(sum(counters["graph_break"].values())),
            "cudagraph_skips": int(counters["inductor"].get("cudagraph_skips", 0))}


def step_sampler(sampler_fn, device, path: str = "off"):
    """`sampler_fn` on step path `path`: "off" (eager; a StepGraphSampler that says so),
    "cuda-graph" (StepGraphSampler) or "compile" (CompiledStepSampler, reduce-overhead)."""
    if path not in STEP_PATHS:
        raise ValueError(f"step path must be one of {', '.join(STEP_PATHS)}, got {path!r}")
    if path == COMPILED:
        return CompiledStepSampler(sampler_fn, device)
    return StepGraphSampler(sampler_fn, device, enabled=path == CUDA_GRAPH)

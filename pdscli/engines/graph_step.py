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
"""

from __future__ import annotations

import contextlib

import torch

from pdscli.errors import first_line
from pdscli.noise import SampleNoise

EAGER, CUDA_GRAPH = "eager", "cuda-graph"


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

    def __call__(self, score, noise, steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None, **extra):
        # `extra`: a sampler's own keywords (the PC family's `options`), passed through unchanged.
        opts = dict(precond=precond, snr=snr, per_sample_step=per_sample_step, **extra)
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
        extra = tuple(sorted((k, repr(v)) for k, v in opts.items() if k not in ("precond", "snr", "per_sample_step")))
        return (id(score), getattr(noise, "seed", None), len(noise), getattr(noise, "shape", None), id(steps),
                id(opts["precond"]), float(opts["snr"]), bool(opts["per_sample_step"]), extra)

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

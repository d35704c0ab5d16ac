"""PyTorch engine: an `nn.Module` with `net(x, sigma) -> score` as the score callable.

Eager by default. `compile=True` runs it through `torch.compile` (fixed shapes: the sampler's
batch does not change within a run). `channels_last=True` stores the weights and the network's
input NHWC, the layout cuDNN's tensor-core convolutions read natively (fp16/bf16 on a GPU); the
score handed back is in the ordinary layout again. `cuda_graph=True` captures one network call at a fixed
batch in a CUDA graph and replays it each step: static input/output buffers, inputs copied in;
partial batches are padded by `BatchAdapter`.
"""

from __future__ import annotations

import torch
from torch import nn

from pdscli.devices import PRECISIONS
from pdscli.engines.contract import BatchAdapter
from pdscli.errors import PdsError
from pdscli.score import TorchScore, as_inputs

WARMUP_CALLS = 3  # before capture: cuDNN autotuning and lazy allocations must not be captured


class CudaGraphScore:
    """One captured call of `fn` at batch `batch`; every call replays it on new inputs."""

    def __init__(self, fn, device, shape, batch: int):
        self.fn, self.device, self.batch = fn, torch.device(device), batch
        if self.device.type != "cuda":
            raise PdsError("--cuda-graph needs --device cuda")
        self.x = torch.zeros((batch, *shape), device=self.device)
        self.sigma = torch.ones((batch,), device=self.device)
        self.out = None
        self.graph = None

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.fn(self.x, self.sigma)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn(self.x, self.sigma)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, sigma = as_inputs(x, sigma, self.device)
        if x.shape[0] != self.batch:
            raise ValueError(f"CUDA graph captured at batch {self.batch}, called with {x.shape[0]}")
        self.x.copy_(x)
        self.sigma.copy_(sigma)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out.clone()  # the static output is overwritten by the next replay


def torch_score(
    net: nn.Module,
    *,
    device="cpu",
    precision: str | None = None,
    compile: bool = False,
    cuda_graph: bool = False,
    batch_size: int | None = None,
    shape=None,
    channels_last: bool = False,
):
    """The score callable of `net` on `device` (the net is moved and, at fp16/bf16, converted
    in place with its `set_precision`: time embedding and normalisation statistics stay float32).
    `cuda_graph` needs `batch_size` and `shape` (C, H, W)."""
    if precision and precision != "fp32":
        if not hasattr(net, "set_precision"):
            raise PdsError(f"this model cannot run at {precision} (it has no set_precision)")
        net.set_precision(PRECISIONS[precision])
    engine = TorchScore(net, device, compile=compile, channels_last=channels_last)
    if not cuda_graph:
        return engine
    if batch_size is None or shape is None:
        raise ValueError("cuda_graph needs batch_size and shape")

    def call(x, sigma):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return engine.fn(x, sigma).float()

    return BatchAdapter(CudaGraphScore(call, device, shape, batch_size), batch_size, batch_size)

"""scripts/peers.py's harness (no peer code here: a fake checkout stands in for k-diffusion): the
peer's imports that it never calls are stubbed, the model reaches it as the EDM denoiser, its
grid ends with 0 like pds's with the denoise, and the budget is found by counting calls."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.noise import SampleNoise
from pdscli.samplers import REGISTRY
from pdscli.samplers.grids import geometric

REPO = Path(__file__).resolve().parents[1]

FAKE_SAMPLING = '''
import math
import torch
import torchsde  # stubbed by the harness: never called
from torchdiffeq import odeint  # the same


def get_sigmas_exponential(n, sigma_min, sigma_max, device="cpu"):
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp()
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]), **extra_args)
        x = x + (sigmas[i + 1] - sigmas[i]) * (x - denoised) / sigmas[i]
    return x
'''


@pytest.fixture
def peers(tmp_path, monkeypatch):
    (tmp_path / "k_diffusion").mkdir()
    (tmp_path / "k_diffusion" / "__init__.py").write_text("raise ImportError('the package init must not run')\n")
    (tmp_path / "k_diffusion" / "sampling.py").write_text(FAKE_SAMPLING)
    before = set(sys.modules)
    spec = importlib.util.spec_from_file_location("peers_script", REPO / "scripts" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "peers_script", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "K_DIFFUSION", [("sample_euler", {}, False)])
    yield module, tmp_path
    for name in set(sys.modules) - before:  # the fake peer and the stubs must not leak into other tests
        sys.modules.pop(name, None)


def test_a_peer_runs_from_its_checkout_on_pds_noise_and_grid(peers):
    module, checkout = peers
    found, sources = module.peers(str(checkout), None)
    assert [p.name for p in found] == ["sample_euler"] and "unknown" in sources["k-diffusion"]["version"]
    model = GaussianImageModel(8, 1)
    steps = module.peer_grid(sources, "geometric", model.settings, 6)
    assert torch.allclose(steps.sigma, geometric(model.settings, 6).sigma, rtol=1e-5)
    # Euler in sigma on the denoiser ending with a step to 0 is pds's ddim ending with the denoise.
    theirs = found[0].sampler()(model.score, SampleNoise(0, range(3), model.shape), steps)
    ours = REGISTRY["ddim"].fn(model.score, SampleNoise(0, range(3), model.shape), steps)
    assert torch.allclose(theirs, ours, atol=1e-4)


def test_the_budget_is_the_most_levels_whose_counted_calls_fit(peers):
    module, checkout = peers
    found, sources = module.peers(str(checkout), None)
    model = GaussianImageModel(8, 1)
    run = found[0].sampler()
    grid = lambda n: module.peer_grid(sources, "geometric", model.settings, n)
    assert module.fit_budget(run, model, grid, 7, {}) == (7, 7)
    assert module.fit_budget(run, model, grid, 1, {}) is None


# A real ComfyUI checkout, where one is at hand (scripts/peers.py's --comfyui): PDS_PEERS names the folder holding it.
COMFYUI = Path(os.environ.get("PDS_PEERS", "/tmp/peers")) / "ComfyUI"


@pytest.mark.skipif(not (COMFYUI / "comfy" / "k_diffusion" / "sampling.py").is_file(),
                    reason=f"no ComfyUI checkout at {COMFYUI} (set PDS_PEERS to the folder holding ComfyUI/)")
def test_res_multistep_agrees_with_comfyuis(peers):
    module, _ = peers
    found, _ = module.peers(None, str(COMFYUI))  # loaded once: its imports do not load twice in a process
    peer = next(p for p in found if p.name == "sample_res_multistep")
    model = GaussianImageModel(8, 1)
    for n in (2, 3, 8):
        steps = geometric(model.settings, n)
        theirs = peer.sampler()(model.score, SampleNoise(0, range(3), model.shape), steps)
        ours = REGISTRY["res-multistep"].fn(model.score, SampleNoise(0, range(3), model.shape), steps)
        assert torch.allclose(theirs, ours, atol=1e-4), (n, (theirs - ours).abs().max())

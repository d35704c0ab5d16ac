"""The samplers' shared contract: the callback's `denoised`, the package's module names, and no
module reaching into another's private names."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

import pdscli
from pdscli.noise import SampleNoise
from pdscli.samplers import REGISTRY, get_sampler, pc_steps
from pdscli.samplers.plan import plan
from pdscli.settings import SamplingSettings

SHAPE = (1, 8, 8)
PACKAGE = Path(pdscli.__file__).parent


def _score(x, sigma):
    """A nonlinear, sigma-dependent score, so a D computed at the wrong point shows."""
    s = sigma.float()[:, None, None, None]
    return -(x - 0.5) / (s**2 + 0.3) + 0.1 * torch.tanh(torch.roll(x, 1, dims=-1) - x)


def _steps(name: str, settings: SamplingSettings, n: int):
    return plan(name, settings=settings, steps=n).steps


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_callback_denoised_is_tweedie_at_an_evaluation_of_the_step(name):
    settings = SamplingSettings(sigma_min=0.02, sigma_max=10.0, num_scales=100, snr=0.16, image_size=8, num_channels=1)
    evaluations: list[tuple[torch.Tensor, float, torch.Tensor]] = []
    per_step: list[list] = [[]]

    def score(x, sigma):
        s = _score(x, sigma)
        per_step[-1].append((x.clone(), float(sigma[0]), s.clone()))
        return s

    def callback(info):
        evaluations.append((info, per_step[-1]))
        per_step.append([])

    get_sampler(name)(score, SampleNoise(3, range(2), SHAPE), _steps(name, settings, 5), callback=callback)
    assert len(evaluations) == 5
    for info, calls in evaluations:
        assert calls, f"{name}: step {info['i']} made no score call"
        tweedies = [x + sigma**2 * s for x, sigma, s in calls]
        assert any(torch.allclose(info["denoised"], d, rtol=1e-5, atol=1e-5) for d in tweedies), (name, info["i"])


def test_pc_is_a_module_holding_its_samplers():
    module = importlib.import_module("pdscli.samplers.pc")
    import pdscli.samplers as samplers

    assert samplers.pc is module and isinstance(module, ModuleType)
    assert callable(module.corrector_stalls) and get_sampler("pc") is module.pc


def _private_uses(path: Path) -> list[str]:
    """`from pdscli.x import _name` and `module._name` (module imported from pdscli) in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("pdscli")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pdscli"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
                elif importlib.util.find_spec(f"{node.module}.{alias.name}") if _is_package(node.module) else False:
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


def _is_package(name: str) -> bool:
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.submodule_search_locations is not None


def test_no_module_imports_a_private_name_from_another():
    found = [use for path in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_scan_sees_both_forms(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("from pdscli.samplers.pc import _correct\nfrom pdscli import samplers\nsamplers._x\n")
    assert len(_private_uses(sample)) == 2


def test_each_sampler_takes_only_its_own_keywords():
    pc_family = {n for n, s in REGISTRY.items() if s.pc_grid}
    for name, info in REGISTRY.items():
        own = info.keywords - {"precond", "callback"}
        if name in ("pc", "pds", "corrector"):
            assert own == {"snr", "per_sample_step", "options"}, name
        elif name == "predictor":
            assert own == {"options"}, name  # no corrector, so no Langevin step size
        else:
            assert name not in pc_family and not own & {"snr", "per_sample_step", "options"}, name
        assert {"precond", "callback"} <= info.keywords, name


def test_sampler_kwargs_passes_a_sampler_only_what_it_takes():
    from pdscli.samplers import sampler_kwargs

    run = dict(precond=None, snr=0.2, per_sample_step=True, callback=print)
    assert sampler_kwargs("pc", **run) == run
    assert sampler_kwargs("predictor", **run) == {"precond": None, "callback": print}
    assert sampler_kwargs("dpm++2m", **run) == {"precond": None, "callback": print}
    with pytest.raises(TypeError):
        get_sampler("ddim")(_score, lambda: torch.zeros(1, *SHAPE), pc_steps(
            SamplingSettings(sigma_min=0.02, sigma_max=10.0, num_scales=10, snr=0.16, image_size=8, num_channels=1), 3),
            snr=0.16)

#!/usr/bin/env python
"""k-diffusion's and ComfyUI's samplers, run from their own code, beside pds's on the exact models.

    python scripts/peers.py --k-diffusion PATH --comfyui PATH [--only gaussian,mixture,builtin] [--samples 256]

PATH is a checkout (a folder holding `k_diffusion/` or `comfy/`; its commit is read with git) or
the word `installed` (the package on sys.path; its version from the package metadata). Their code
is imported, never copied: the sampling modules are loaded as they are, and only the imports
their sampling functions never call are stubbed while they load (torchsde and torchdiffeq,
torchvision's image helpers, ComfyUI's model patcher and model-sampling classes); stochastic
samplers get their noise through `noise_sampler`, so torchsde is never needed.

Each peer sees the model as the EDM denoiser D(x, sigma) = x + sigma^2 s(x, sigma) of pds's score
s, starts from the same x_T = sigma_max z, and (stochastic ones) draws its later noise from the same
counter-based stream (`pdscli.noise.SampleNoise`) as pds's samplers. Budget N: the most levels
whose counted score calls are <= N (a dry run counts them), on the peer's own grid functions
(k-diffusion's `get_sigmas_exponential`, log-uniform, and `get_sigmas_karras`, rho 7), which end
with 0 as pds's grids end with the Tweedie denoise.

Writes docs/data/peers-gaussian.json and docs/data/peers-mixture.json (scripts/samplers_doc.py
renders them into docs/samplers.md):
  * gaussian: the exact Gaussian model (3x32x32), the exact spectral KL of each sampler's output
    (pdscli.evaluate.moments.exact_second_moments: no samples, no sampling floor), and the
    floor every sampler shares: the exact ODE to sigma_min followed by the Tweedie denoise.
  * mixture: the mixture model (3x32x32), N samples (default 128) from the same noise for every
    sampler at 5-50 NFE: mode TV and the weight-averaged per-mode spectral KL; N exact draws give the
    sampling floor. The samplers that trail on the Gaussian at every budget are left out here.
  * builtin: the built-in digits network (1x16x16), N samples (256 recorded) from the same noise for
    every peer at 5, 8 and 10 NFE on both grids, and `pds sample --nfe N` as a user runs it
    (pdscli.sample: the planner, the built-in filters, --teleport auto): the Fréchet distance in the
    digit classifier's features against all real digits, with its floor (N real digits), and the
    classifier check's figures (pdscli.evaluate.digits). Writes docs/data/peers-builtin.json.
pds itself is measured in the same harness: its samplers on the geometric and edm grids, and
the grids fitted to the data statistics (`--schedule stats`, pdscli.samplers.fitted) and
`--teleport auto` (pdscli.samplers.teleport, the samplers and budgets it teleports); on the
Gaussian also on ComfyUI's AYS and GITS tables (read from its scheduler nodes' files as data).
One thread; the Gaussian part takes ~15 minutes, the mixture part ~20, the builtin part (256 samples) ~7
on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.metadata
import inspect
import json
import math
import platform
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdscli.evaluate import digits as qc  # noqa: E402
from pdscli.evaluate.analytic import GaussianImageModel  # noqa: E402
from pdscli.evaluate.measures import mixture_quality  # noqa: E402
from pdscli.evaluate.moments import exact_second_moments, kl_of_moments  # noqa: E402
from pdscli.evaluate.mixture import MixtureImageModel  # noqa: E402
from pdscli.models import builtin  # noqa: E402
from pdscli.noise import SampleNoise  # noqa: E402
from pdscli.samplers import REGISTRY, fitted  # noqa: E402
from pdscli.samplers.teleport import DataGaussian, TeleportNoise, auto_ratio, spread  # noqa: E402
from pdscli.samplers.grids import Steps, make_steps, steps_from_levels  # noqa: E402
from pdscli.samplers.plan import steps_for_nfe  # noqa: E402

DATA = REPO / "docs" / "data"
BUDGETS = [5, 8, 10, 15, 20, 35, 50]
PDS_SAMPLERS = ["dpm++2m", "dpm++3m", "ipndm", "ipndm-v", "gradient-estimation", "res-multistep", "heun", "dpm++2m-sde",
                "dpm++2m-sde-mid", "euler-a"]
PDS_GRIDS = ["geometric", "edm"]
STATS_SAMPLERS = ["dpm++2m", "dpm++3m", "ipndm", "gradient-estimation"]  # fitted grids: deterministic ones
# The mixture runs take samples: there, the samplers that trail on the Gaussian at every budget are left out.
MIXTURE_SKIP = {"sample_euler", "sample_heun", "sample_lms", "sample_dpmpp_2m_sde solver_type=heun", "sample_dpmpp_3m_sde",
                "sample_euler_ancestral", "heun", "euler-a"}
TABLE_BUDGETS = [5, 8, 10, 15, 20]  # the grid comparison (AYS, GITS, fitted): from 35 NFE all sit at the floor
BUILTIN_BUDGETS = [5, 8, 10]  # the few-step frontier on the network
MIXTURE_BUDGETS = BUDGETS  # sampled runs: 128 samples each (the 35-50 NFE runs take most of the time)

# (library, function name, keyword arguments, stochastic). Samplers that need ComfyUI's
# model-sampling objects (its SDE and ancestral variants) are left out: the denoiser alone cannot feed them.
K_DIFFUSION = [
    ("sample_euler", {}, False), ("sample_heun", {}, False), ("sample_lms", {}, False),
    ("sample_dpmpp_2m", {}, False), ("sample_dpmpp_3m_sde", {"eta": 0.0}, False),
    ("sample_dpmpp_2m_sde", {}, True), ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    ("sample_dpmpp_3m_sde", {}, True), ("sample_euler_ancestral", {}, True),
]
COMFYUI = [
    ("sample_ipndm", {}, False), ("sample_ipndm_v", {}, False), ("sample_deis", {}, False),
    ("sample_gradient_estimation", {}, False), ("sample_res_multistep", {}, True),
    ("sample_unipc", {}, False), ("sample_unipc_bh2", {}, False),
]


# ---------------------------------------------------------------------------- loading the peers


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        importlib.import_module(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _never_called(*_, **__):
    raise RuntimeError("a stubbed dependency was called: pass noise_sampler / use another sampler")


def _stub_unused_imports() -> None:
    _stub("torchsde", BrownianInterval=_never_called, BrownianTree=_never_called)
    _stub("torchdiffeq", odeint=_never_called)
    _stub("torchvision")
    _stub("torchvision.transforms")
    _stub("torchvision.transforms.functional", to_tensor=_never_called, to_pil_image=_never_called)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]


def _namespace(name: str, folder: Path) -> None:
    """A package whose __init__ is not run: its submodules load from `folder`."""
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module


def _git_commit(folder: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def load_k_diffusion(where: str) -> tuple[types.ModuleType, str]:
    _stub_unused_imports()
    if where == "installed":
        return importlib.import_module("k_diffusion.sampling"), "k-diffusion " + importlib.metadata.version("k-diffusion")
    root = Path(where).resolve()
    _namespace("k_diffusion", root / "k_diffusion")
    return importlib.import_module("k_diffusion.sampling"), _git_commit(root)


def load_comfyui(where: str) -> tuple[dict[str, Callable], str]:
    _stub_unused_imports()
    if where == "installed":
        raise SystemExit("ComfyUI is not an installable package: give its checkout")
    root = Path(where).resolve()
    _namespace("comfy", root / "comfy")
    _namespace("comfy.k_diffusion", root / "comfy" / "k_diffusion")
    _namespace("comfy.extra_samplers", root / "comfy" / "extra_samplers")
    _stub("comfy.model_patcher", set_model_options_post_cfg_function=_never_called)
    _stub("comfy.model_sampling", CONST=type("CONST", (), {}))
    sampling = importlib.import_module("comfy.k_diffusion.sampling")
    uni_pc = importlib.import_module("comfy.extra_samplers.uni_pc")
    fns = {name: getattr(sampling, name) for name, _, _ in COMFYUI if hasattr(sampling, name)}
    fns["sample_unipc"], fns["sample_unipc_bh2"] = uni_pc.sample_unipc, uni_pc.sample_unipc_bh2
    read_tables(root)
    return fns, _git_commit(root)


# ---------------------------------------------------------------------------- one contract


@dataclass
class Peer:
    library: str
    name: str  # the function, with its non-default keywords
    fn: Callable
    kwargs: dict
    stochastic: bool

    def sampler(self) -> Callable:
        """The peer as a pds sampler: (score, noise, steps, *, precond=None, ...) -> x."""

        def run(score, noise, steps: Steps, *, precond=None, **_):
            def denoiser(x, sigma, **__):
                return x + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2 * score(x, sigma)

            sigmas = torch.cat([steps.sigma, steps.sigma.new_zeros(1)]).to(torch.float32)
            x = steps.sigma_max * noise()
            # Every function that takes a noise_sampler gets one (3M SDE at eta 0 builds a torchsde
            # tree otherwise, and never draws from it).
            takes_noise = "noise_sampler" in inspect.signature(self.fn).parameters
            extra = {"noise_sampler": lambda *_: noise()} if takes_noise else {}
            with torch.no_grad():
                return self.fn(denoiser, x, sigmas, extra_args={}, disable=True, **extra, **self.kwargs)

        return run


def peers(k_diffusion: str | None, comfyui: str | None) -> tuple[list[Peer], dict]:
    out, sources = [], {}
    if k_diffusion:
        sampling, version = load_k_diffusion(k_diffusion)
        sources["k-diffusion"] = {"source": "crowsonkb/k-diffusion, k_diffusion/sampling.py", "version": version}
        for name, kwargs, stochastic in K_DIFFUSION:
            label = name + "".join(f" {k}={v}" for k, v in kwargs.items())
            out.append(Peer("k-diffusion", label, getattr(sampling, name), kwargs, stochastic))
        sources["k-diffusion"]["grids"] = {"geometric": sampling.get_sigmas_exponential, "edm": sampling.get_sigmas_karras}
    if comfyui:
        fns, version = load_comfyui(comfyui)
        sources["ComfyUI"] = {"source": "Comfy-Org/ComfyUI, comfy/k_diffusion/sampling.py and comfy/extra_samplers/uni_pc.py",
                              "version": version}
        for name, kwargs, stochastic in COMFYUI:
            if name in fns:
                out.append(Peer("ComfyUI", name, fns[name], kwargs, stochastic))
    return out, sources


def peer_grid(sources: dict, grid: str, settings, n: int) -> Steps:
    """n levels of the peer library's own grid function (k-diffusion's), sigma_max ... sigma_min."""
    build = sources["k-diffusion"]["grids"][grid] if "k-diffusion" in sources else None
    if build is None:
        return make_steps(grid, settings, n)
    sigmas = build(n, settings.sigma_min, settings.sigma_max).to(torch.float64)
    return steps_from_levels(sigmas[:-1], settings.sigma_max)


def count_calls(run: Callable, model, steps: Steps) -> int:
    calls = [0]

    def score(x, sigma):
        calls[0] += 1
        return model.score(x, sigma)

    try:
        run(score, SampleNoise(0, [0], model.shape), steps)
    except Exception:  # a grid this peer cannot run: never fits a budget
        return 10**9
    return calls[0]


def fit_budget(run: Callable, model, grid: Callable[[int], Steps], nfe: int, cache: dict) -> tuple[int, int] | None:
    """(levels, calls): the most levels whose counted calls are <= nfe; None if 2 levels cost more."""
    best = None
    for n in range(2, nfe + 2):
        if n not in cache:
            cache[n] = count_calls(run, model, grid(n))
        if cache[n] > nfe:
            break
        best = (n, cache[n])
    return best


# ---------------------------------------------------------------------------- measures


def gaussian_floor(model: GaussianImageModel) -> float:
    """KL of the exact ODE's output at sigma_min after the Tweedie denoise: variance lam^2 / (lam + sigma_min^2)."""
    lam = model.lam
    return kl_of_moments(model, lam**2 / (lam + model.settings.sigma_min**2))


def gaussian_measure(model, run, steps, stochastic: bool) -> dict:
    moments = exact_second_moments(model, run, steps, max_draws=None if stochastic else 1)
    kl = kl_of_moments(model, moments)
    return {"kl": kl if kl == kl and kl != float("inf") else None}


def mixture_measure(model, run, steps, stochastic: bool, n_samples: int) -> dict:
    out = run(model.score, SampleNoise(0, range(n_samples), model.shape), steps)
    if not torch.isfinite(out).all():
        return {"mode_tv": None, "mean_mode_kl": None}
    q = mixture_quality(model, out)
    return {"mode_tv": q["mode_tv"], "mean_mode_kl": q["mean_mode_kl"], "mode_shares": q["mode_shares"]}


TABLES: dict[str, list] = {}  # ComfyUI's AYS (SD1) and GITS (coefficient 1.20) sigma tables, read from its files


def read_tables(root: Path) -> None:
    """The NOISE_LEVELS tables of ComfyUI's AYS and GITS scheduler nodes, read as data (ast), not run."""
    for key, name, pick in (("ays", "nodes_align_your_steps.py", lambda t: t["SD1"]),
                            ("gits", "nodes_gits.py", lambda t: t[1.20])):
        tree = ast.parse((root / "comfy_extras" / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NOISE_LEVELS" for t in node.targets):
                TABLES[key] = pick(ast.literal_eval(node.value))


def _loglinear(levels: list[float], count: int) -> np.ndarray:
    """Resample decreasing levels to `count`, linearly in log sigma (what both scheduler nodes do)."""
    xs = np.linspace(0, 1, len(levels))
    return np.exp(np.interp(np.linspace(0, 1, count), xs, np.log(levels[::-1])))[::-1]


def table_grid(kind: str, settings, n: int) -> Steps:
    """AYS / GITS for n levels as ComfyUI's nodes build them (steps + 1 values, the last set to 0),
    with the table's sigma range mapped onto the model's, affinely in log sigma."""
    table = TABLES[kind]
    if kind == "ays":
        values = np.asarray(table if n + 1 == len(table) else _loglinear(table, n + 1))
    else:
        values = np.asarray(table[n - 2] if n <= 20 else _loglinear(table[-1], n + 1))
    lo, hi = math.log(values[-1]), math.log(values[0])
    smin, smax = math.log(settings.sigma_min), math.log(settings.sigma_max)
    mapped = np.exp(smin + (np.log(values) - lo) / (hi - lo) * (smax - smin))
    return steps_from_levels(torch.as_tensor(mapped[:-1].copy()), settings.sigma_max)


def data_gaussian(model) -> DataGaussian:
    """The model's Gaussian approximation, as `pds sample` builds it for an exact model."""
    gauss = model.moment_matched() if hasattr(model, "moment_matched") else model
    return DataGaussian(torch.full(gauss.shape, gauss.mean, dtype=torch.float64), gauss.lam)


def teleported(model, name: str, n: int, nfe: int) -> Callable | None:
    """pds `name` as `--teleport auto` runs it at this budget (None: auto does not teleport it):
    x_T carried to sigma_t by the data's Gaussian, then the log-uniform grid from sigma_t.

    The Gaussian part measures a centred copy of the model (mean 0) with impulses, and the bias
    with the real one: the teleport's mean follows the score it is given."""
    ratio = auto_ratio(name, nfe)
    if ratio is None:
        return None
    gaussian = data_gaussian(model)
    centred = DataGaussian(torch.zeros_like(gaussian.mean), gaussian.spectrum)
    sigma_t = ratio * spread(gaussian)
    steps = make_steps("geometric", model.settings.replace(sigma_max=sigma_t), n)
    info = REGISTRY[name]

    def run(score, noise, _steps, **kw):
        g = gaussian if score == model.score else centred
        start = TeleportNoise(noise, g, model.settings.sigma_max, sigma_t, stochastic=not info.deterministic)
        return info.fn(score, start, steps, **kw)

    return run


def pds_steps(model, name: str, grid: str, n: int) -> Steps:
    """pds's grid: a named schedule, AYS / GITS, or `stats`, fitted to the model's second-order statistics."""
    if grid in ("ays", "gits"):
        return table_grid(grid, model.settings, n)
    if grid != "stats":
        return make_steps(grid, model.settings, n)
    return fitted.fitted_steps(name, REGISTRY[name].fn, fitted.spectrum_of_model(model), model.settings, n)


def measure(model, measure_fn, peer_list, sources, grids, log, skip=frozenset(), budgets=BUDGETS) -> list[dict]:
    rows = []
    settings = model.settings
    extra = [g for g in ("ays", "gits") if g in TABLES and len(grids) > 1]  # the grid comparison: Gaussian only
    for grid in [*grids, *extra, "stats", "teleport"]:
        for peer in peer_list:
            if grid in ("ays", "gits", "stats", "teleport"):
                break
            run, cache = peer.sampler(), {}
            for nfe in budgets:
                fit = fit_budget(run, model, lambda n: peer_grid(sources, grid, settings, n), nfe, cache)
                if fit is None:
                    continue
                n, spent = fit
                t0 = time.perf_counter()
                try:
                    m = measure_fn(model, run, peer_grid(sources, grid, settings, n), peer.stochastic)
                except Exception as e:  # a peer that fails on this grid: recorded, not fatal
                    m = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                rows.append({"library": peer.library, "sampler": peer.name, "grid": grid, "nfe": nfe, "spent": spent,
                             "levels": n, **m, "seconds": round(time.perf_counter() - t0, 2)})
            log(f"{peer.library} {peer.name} {grid}: " + " ".join(_short(r) for r in rows if r["sampler"] == peer.name
                                                                   and r["grid"] == grid))
        for name in STATS_SAMPLERS if grid in ("ays", "gits", "stats", "teleport") else [n for n in PDS_SAMPLERS if n not in skip]:
            info = REGISTRY[name]
            for nfe in [b for b in budgets if b in TABLE_BUDGETS] if grid in ("ays", "gits", "stats", "teleport") else budgets:
                try:
                    n = steps_for_nfe(name, nfe)
                except Exception:  # the budget is below the sampler's fewest steps
                    continue
                t0 = time.perf_counter()
                if grid == "teleport":
                    run = teleported(model, name, n, nfe)
                    if run is None:
                        continue
                    m = measure_fn(model, run, make_steps("geometric", settings, n), not info.deterministic)
                else:
                    m = measure_fn(model, info.fn, pds_steps(model, name, grid, n), not info.deterministic)
                rows.append({"library": "pds", "sampler": name, "grid": grid, "nfe": nfe, "spent": info.nfe(n),
                             "levels": n, **m, "seconds": round(time.perf_counter() - t0, 2)})
            log(f"pds {name} {grid}: " + " ".join(_short(r) for r in rows if r["library"] == "pds" and r["sampler"] == name
                                                  and r["grid"] == grid))
    return rows


def digit_figures(clf, reference: np.ndarray, images: torch.Tensor) -> dict:
    """FD against the real digits' features and the classifier check of images in [0, 1]."""
    if not torch.isfinite(images).all():
        return {"fd": None, "passes": False, "failures": ["non-finite samples"]}
    m = qc.evaluate(clf, images)
    fails = qc.failures(m)
    return {"fd": qc.fd(clf, images, reference), **m, "passes": not fails, "failures": fails}


def pds_choice(nfe: int) -> dict:
    """What `pds sample --nfe nfe` picks on the built-in model (its run.json): sampler, steps, sigma_t."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "pdscli", "sample", "--nfe", str(nfe), "-n", "1", "--out", str(out),
                        "--quiet", "--device", "cpu"], check=True, capture_output=True)
        record = json.loads((out / "run.json").read_text())
    return {"picked": record["sampler"], "levels": record["steps"]["count"], "teleport": record["teleport"]}


def measure_builtin(peer_list, sources, n_samples: int, log) -> dict:
    """Peers on both grids and `pdscli.sample(builtin, n, nfe=N)`, all from SampleNoise(0, range(n))."""
    import pdscli

    network = builtin.default_score_model("cpu")
    # The harness reads .score, .shape and .settings of a model.
    model = types.SimpleNamespace(score=network.score, shape=network.settings.shape, settings=network.settings)
    clf, _ = qc.digit_classifier(heldout=False)
    reference = qc.features(clf, qc.real_images())
    rows = []
    for grid in ("geometric", "edm"):
        for peer in peer_list:
            run, cache = peer.sampler(), {}
            for nfe in BUILTIN_BUDGETS:
                fit = fit_budget(run, model, lambda n: peer_grid(sources, grid, model.settings, n), nfe, cache)
                if fit is None:
                    continue
                n, spent = fit
                t0 = time.perf_counter()
                try:
                    out = run(model.score, SampleNoise(0, range(n_samples), model.shape), peer_grid(sources, grid, model.settings, n))
                    m = digit_figures(clf, reference, out.clamp(0, 1))
                except Exception as e:  # recorded, not fatal
                    m = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                rows.append({"library": peer.library, "sampler": peer.name, "grid": grid, "nfe": nfe, "spent": spent,
                             "levels": n, **m, "seconds": round(time.perf_counter() - t0, 2)})
            log(f"{peer.library} {peer.name} {grid}: " + " ".join(
                f"{r['fd']:.2f}" if r.get("fd") is not None else "nan"
                for r in rows if r["sampler"] == peer.name and r["grid"] == grid))
    loaded = pdscli.load("builtin", device="cpu")
    for nfe in BUILTIN_BUDGETS:
        t0 = time.perf_counter()
        out = pdscli.sample(loaded, n_samples, nfe=nfe, seed=0)
        m = digit_figures(clf, reference, out)
        rows.append({"library": "pds", "sampler": f"--nfe {nfe}", "grid": "default", "nfe": nfe, "spent": nfe,
                     **pds_choice(nfe), **m, "seconds": round(time.perf_counter() - t0, 2)})
        log(f"pds --nfe {nfe}: {m['fd']:.2f}")
    return {"model": "builtin:digits 1x16x16", "settings": model.settings.to_dict(), "num_samples": n_samples,
            "floor": {"fd": qc.fd_floor(clf, n_samples)}, "rows": rows}


def _short(row: dict) -> str:
    value = row.get("kl", row.get("mode_tv"))
    return "nan" if value is None else f"{value:.2e}"


def _without_out(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            out.append(a)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k-diffusion", help="a k-diffusion checkout, or 'installed'")
    ap.add_argument("--comfyui", help="a ComfyUI checkout")
    ap.add_argument("--only", default="gaussian,mixture", help="comma list of gaussian, mixture, builtin")
    ap.add_argument("--samples", type=int, default=128, help="samples per run (mixture, builtin)")
    ap.add_argument("--out", type=Path, default=DATA)
    args = ap.parse_args(argv)
    if not (args.k_diffusion or args.comfyui):
        ap.error("name at least one peer: --k-diffusion PATH and/or --comfyui PATH")
    torch.set_num_threads(1)
    peer_list, sources = peers(args.k_diffusion, args.comfyui)
    log = lambda msg: print(msg, flush=True)
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, one thread",
        "date": time.strftime("%Y-%m-%d"),
        # the checkouts by folder name; --out does not change what is measured
        "command": "python scripts/peers.py " + " ".join(
            a if not Path(a).is_absolute() else Path(a).name for a in _without_out(argv or sys.argv[1:])),
        "pds": _git_commit(REPO),
        "sources": {lib: {k: v for k, v in s.items() if k != "grids"} for lib, s in sources.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for part in args.only.split(","):
        if part == "gaussian":
            model = GaussianImageModel()
            rows = measure(model, gaussian_measure, peer_list, sources, ["geometric", "edm"], log)
            result = {"model": model.describe() if hasattr(model, "describe") else "gaussian 3x32x32",
                      "settings": model.settings.to_dict(), "floor": {"kl": gaussian_floor(model)}, "rows": rows}
        elif part == "mixture":
            model = MixtureImageModel()
            ref, _ = model.sample(args.samples, generator=torch.Generator().manual_seed(0))
            floor = mixture_quality(model, ref)
            fn = lambda m, run, steps, stochastic: mixture_measure(m, run, steps, stochastic, args.samples)
            kept = [p for p in peer_list if p.name not in MIXTURE_SKIP]
            rows = measure(model, fn, kept, sources, ["geometric"], log, skip=MIXTURE_SKIP, budgets=MIXTURE_BUDGETS)
            result = {"model": model.describe(), "num_samples": args.samples,
                      "floor": {"mode_tv": floor["mode_tv"], "mean_mode_kl": floor["mean_mode_kl"]}, "rows": rows}
        elif part == "builtin":
            result = measure_builtin(peer_list, sources, args.samples, log)
        else:
            raise SystemExit(f"--only: unknown part {part!r}")
        path = args.out / f"peers-{part}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**result, "meta": meta}, indent=1) + "\n")
        tmp.replace(path)
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""Part `overhead`: what the PDS preconditioner adds per score evaluation, as a fraction of one
network call of each backend."""

from __future__ import annotations

import torch

from pdscli.bench.config import BenchConfig
from pdscli.bench.latency import fastest_nfe, nfe_median
from pdscli.bench.model import BenchModel
from pdscli.bench.timing import time_calls
from pdscli.precondition import Preconditioner


def measure_overhead(cfg: BenchConfig, model: BenchModel, precond: Preconditioner, entries: list[dict],
                     e2e_name: str | None) -> dict:
    """The preconditioner's cost per score evaluation, against one NFE of each backend.

    Each PC / PDS update (corrector or predictor) evaluates the score once and applies
    M M^T to it and M to one fresh draw, so (noise + grad) per NFE is exactly what PDS adds."""
    rows = []
    for b in cfg.batch_sizes:
        z = torch.randn((b, *model.shape), generator=torch.Generator().manual_seed(cfg.seed)).to(model.device)
        with torch.no_grad():
            noise = time_calls(lambda: precond.noise(z), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
            grad = time_calls(lambda: precond.grad(z), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
        per_nfe = noise["median_s"] + grad["median_s"]
        fractions = {e["name"]: per_nfe / m for e in entries if (m := nfe_median(entries, e["name"], b))}
        fastest = fastest_nfe(entries, b)
        rows.append({"batch": b, "noise": noise, "grad": grad, "per_nfe_s": per_nfe, "per_pc_step_s": 2 * per_nfe,
                     "fraction_of_nfe": fractions,
                     "fraction_of_e2e_backend_nfe": fractions.get(e2e_name),
                     "fraction_of_fastest_nfe": per_nfe / fastest[1] if fastest else None,
                     "fastest_backend": fastest[0] if fastest else None})
    return {"status": "ok", "preconditioner": precond.describe(), "batches": rows,
            "what": "per NFE: one M z (noise) and one M M^T g (grad); a PC/PDS step makes 2 NFEs and 2 of each"}

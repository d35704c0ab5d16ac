"""`pds sample` and `pds bench` accept and refuse the same values of every flag they share: both
check them at one boundary (pdscli.flag_rules, ModelSpec), with one wording per refusal.

Each case runs both commands with an --out that cannot be used (an existing file): a value the
boundary accepts gets as far as the output check, which refuses the file; a refused value stops
before it, with the flag's own message. No model is opened and nothing is sampled.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from pdscli import flag_rules
from pdscli.errors import PdsError

GAUSSIAN = ["--model", "gaussian", "--image-size", "8", "--channels", "1"]
ACCEPT, REFUSE = "accept", "refuse"

# (arguments, what both must do); cases without a model flag use the small Gaussian model.
CASES = [
    (["--seed", "0"], ACCEPT),
    (["--seed", "7"], ACCEPT),
    (["--seed", str(2**64 - 1)], ACCEPT),
    (["--seed", str(2**64)], REFUSE),
    (["--seed", "-1"], REFUSE),
    (["--seed", "1.5"], REFUSE),
    (["--seed", "abc"], REFUSE),
    (["--speed-up", "0.5"], ACCEPT),
    (["--speed-up", "2.5"], ACCEPT),
    (["--speed-up", "10"], ACCEPT),
    (["--speed-up", "0"], REFUSE),
    (["--speed-up", "-2"], REFUSE),
    (["--speed-up", "inf"], REFUSE),
    (["--speed-up", "nan"], REFUSE),
    (["--speed-up", "fast"], REFUSE),
    (["--steps", "1"], ACCEPT),
    (["--steps", "12"], ACCEPT),
    (["--steps", "0"], REFUSE),
    (["--steps", "2.5"], REFUSE),
    (["--steps", "1000000"], ACCEPT),
    (["--steps", "1000001"], REFUSE),
    (["--steps", "10", "--speed-up", "2"], REFUSE),
    (["--nfe", "5"], ACCEPT),
    (["--nfe", "0"], REFUSE),
    (["--nfe", "x"], REFUSE),
    (["--alpha", "5"], ACCEPT),
    (["--alpha", "0.25"], ACCEPT),
    (["--alpha", "auto"], ACCEPT),
    (["--alpha", "AUTO"], ACCEPT),
    (["--alpha", "0"], REFUSE),
    (["--alpha", "-1"], REFUSE),
    (["--alpha", "inf"], REFUSE),
    (["--alpha", "strong"], REFUSE),
    (["--image-size", "0"], REFUSE),
    (["--channels", "-1"], REFUSE),
    (["--threads", "1"], ACCEPT),
    (["--threads", "0"], REFUSE),
    (["--device", "cpu"], ACCEPT),
    (["--device", "CPU"], ACCEPT),
    (["--device", "tpu"], REFUSE),
    (["--device", "cuda:x"], REFUSE),
    (["--tf32", "off"], ACCEPT),
    (["--tf32", "maybe"], REFUSE),
    (["--masks", "no-such-filters.npz"], REFUSE),
    (["--engine-backend", "cpu"], REFUSE),
    (["--model", "mixture", "--image-size", "8"], ACCEPT),
    (["--model", "GAUSSIAN", "--image-size", "8"], ACCEPT),
    (["--model", "nope"], REFUSE),
    (["--model", "gaussian", "--checkpoint", "c.pth"], REFUSE),
    (["--model", "gaussian", "--engine", "m.onnx"], REFUSE),
    (["--preset", "cifar10"], REFUSE),
    (["--config", "c.json"], REFUSE),
]


def _model_given(args: list[str]) -> bool:
    return any(a in args for a in ("--model", "--checkpoint", "--engine", "--preset", "--config"))


def _outcome(r, sentinel) -> tuple[str, str]:
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return (ACCEPT if str(sentinel) in lines[0] else REFUSE), lines[0]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_sample_and_bench_accept_and_refuse_the_same_values(run_pds, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)  # relative files in the cases do not exist here
    sentinel = tmp_path / "taken"
    sentinel.write_text("an existing file: neither command may write its output here")
    model = [] if _model_given(args) else GAUSSIAN
    common = [*model, *args, "--out", sentinel, "--quiet"]
    sample = _outcome(run_pds("sample", *common), sentinel)
    bench = _outcome(run_pds("bench", *common), sentinel)
    assert sample[0] == bench[0] == expected, (sample, bench)
    if expected == REFUSE:
        assert sample[1] == bench[1]  # one rule, one wording
    assert sentinel.read_text().startswith("an existing file")


def test_an_accepted_value_runs_in_both(run_pds, tmp_path):
    """The values bench used to refuse (--speed-up below 1) and sample used to refuse while bench
    ran them (a negative seed is refused by both now) run end to end in both commands."""
    model = [*GAUSSIAN, "--num-scales", "4"]
    out = tmp_path / "s"
    r = run_pds("sample", *model, "--speed-up", "0.5", "--seed", "3", "-n", "2", "-b", "2", "--out", out,
                "--quiet", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["steps"]["count"] == 8 and np.isfinite(np.load(out / "samples.npz")["samples"]).all()
    r = run_pds("bench", "--model", "gaussian", "--image-size", "8", "--channels", "1", "--speed-up", "0.5",
                "--full-steps", "4", "--seed", "3", "--quick", "--threads", "1", "--quiet", "--json",
                "--skip", "nfe,overhead", "--e2e-batch", "2", "--quality-samples", "2", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    e2e = json.loads(r.stdout)["end_to_end"]
    assert e2e["full_steps"] == 4 and e2e["pds_steps"] == 8


@pytest.mark.parametrize("rule, value, message", [
    (flag_rules.seed, -1, f"--seed must be a whole number from 0 to {2**64 - 1}, not -1"),
    (flag_rules.steps, "0", "--steps must be at least 1, not 0"),
    (flag_rules.speed_up, "fast", "--speed-up must be a positive number, not 'fast'"),
    (flag_rules.alpha, 0.0, "--alpha must be a positive number or auto, not 0"),
    (flag_rules.device, "tpu", "--device must be auto, cpu, cuda or cuda:N, not 'tpu'"),
])
def test_one_wording_for_every_refusal(rule, value, message):
    with pytest.raises(PdsError) as e:
        rule(value)
    assert str(e.value) == message


def test_rules_take_text_and_typed_values_alike():
    assert flag_rules.seed("7") == flag_rules.seed(7) == 7
    assert flag_rules.speed_up("2.5") == flag_rules.speed_up(2.5) == 2.5
    assert flag_rules.alpha(" AUTO ") == "auto" and flag_rules.alpha("5") == "5" and flag_rules.alpha(None) is None
    assert flag_rules.device(" CUDA:1 ") == "cuda:1"


@pytest.mark.parametrize("corrector, nfe_per_step", [("langevin", 2), ("none", 1)])
def test_bench_runs_the_predictor_and_corrector_the_config_names(corrector, nfe_per_step):
    """As `pds sample` does (PCOptions from the model's sampling section), not the reference's pair always."""
    import dataclasses

    import torch

    from pdscli.bench.config import BenchConfig
    from pdscli.bench.model import BenchModel
    from pdscli.bench.runs import SamplingRun
    from pdscli.evaluate.analytic import GaussianImageModel
    from pdscli.sample.model import ModelSpec
    from pdscli.samplers.plan import plan

    g = GaussianImageModel(8, 1)
    settings = dataclasses.replace(g.settings, corrector=corrector)
    model = BenchModel("analytic", g.score, settings, torch.device("cpu"), "gaussian", gaussian=g)
    cfg = BenchConfig(spec=ModelSpec(model="gaussian"), e2e_batch=2, quick=True).resolved()
    run = SamplingRun(g.score, plan("pc", settings=settings, steps=5), None, cfg=cfg, model=model)
    run.run_batch(0, 2)
    assert run.result()["nfe"] == 5 * nfe_per_step

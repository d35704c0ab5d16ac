"""A small, honest trainer for VE score models: score_sde's continuous denoising score matching.

What it does, and nothing more (read score_sde's losses.py / run_lib.py for the original):
- t ~ U(eps, 1), sigma = sigma_min (sigma_max / sigma_min)^t, z ~ N(0, I), x~ = x + sigma z;
- loss per image = reduce over pixels of (s(x~, sigma) sigma + z)^2, where reduce is the mean
  (`training.reduce_mean`) or half the sum; averaged over the batch. With
  `training.likelihood_weighting` the weighting of Song et al. 2021 (g(t)^2 / sigma^2) instead;
- Adam (`optim.*`), linear learning-rate warm-up over `optim.warmup` steps, gradient clipping
  at `optim.grad_clip` (off when negative), an EMA of the weights (`model.ema_rate`) with
  score_sde's warm-up of the decay;
- checkpoints in the score_sde layout (`optimizer`, `model`, `ema`, `step`), written atomically,
  so that `pds sample --checkpoint` loads them and `--resume` continues from them.

Every random draw of step k comes from generators seeded from (seed, k), so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdscli import flag_rules
from pdscli.devices import resolve_device
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import atomic_path, atomic_write_json, atomic_write_text, open_regular, prepare_out_dir
from pdscli.models import build_model, load_config, validate_config
from pdscli.models.checkpoint import load_file, load_score_model, save_checkpoint, save_safetensors
from pdscli.noise import sample_seed
from pdscli.train.datasets import load_dataset, max_pairwise_distance

CHECKPOINT_NAME = "checkpoint.pth"
WEIGHTS_NAME = "ema.safetensors"  # the EMA weights alone, config in its metadata: `pds sample --checkpoint` reads it
CONFIG_NAME = "config.json"
LOG_NAME = "log.jsonl"
SUMMARY_NAME = "train.json"
TRAIN_EPS = 1e-5  # score_sde's smallest training time for the VE SDE


# ----------------------------------------------------------------------------- the objective


def sigmas_at(t: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The VE SDE's noise scale at time t: sigma_min (sigma_max / sigma_min)^t."""
    return sigma_min * (sigma_max / sigma_min) ** t


def dsm_loss(
    net,
    x: torch.Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator,
    reduce_mean: bool = False,
    likelihood_weighting: bool = False,
    eps: float = TRAIN_EPS,
) -> torch.Tensor:
    """score_sde's continuous VE denoising score-matching loss on one batch (a scalar)."""
    b = x.shape[0]
    t = torch.rand(b, generator=generator, device=x.device) * (1.0 - eps) + eps
    z = torch.randn(x.shape, generator=generator, device=x.device)
    sigma = sigmas_at(t, sigma_min, sigma_max)
    s4 = sigma[:, None, None, None]
    score = net(x + s4 * z, sigma)  # a continuous VE net is conditioned on sigma itself
    if likelihood_weighting:
        # g(t)^2 = d sigma^2/dt = 2 sigma^2 log(sigma_max / sigma_min); residual measured on the score.
        g2 = sigma**2 * (2.0 * math.log(sigma_max / sigma_min))
        per_pixel = torch.square(score + z / s4)
    else:
        g2 = None
        per_pixel = torch.square(score * s4 + z)
    flat = per_pixel.reshape(b, -1)
    per_image = flat.mean(dim=1) if reduce_mean else 0.5 * flat.sum(dim=1)
    if g2 is not None:
        per_image = per_image * g2
    return per_image.mean()


# ----------------------------------------------------------------------------- optimisation


class EMA:
    """Exponential moving average of the trainable parameters, as score_sde keeps it.

    The decay ramps up as min(rate, (1 + n) / (10 + n)) over the first updates, so early
    weights do not dominate a short run. `shadow` follows the order of the trainable
    parameters, which is also the order score_sde stores (`ema.shadow_params`).
    """

    def __init__(self, params, rate: float, num_updates: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise PdsError(f"model.ema_rate must lie in [0, 1], got {rate}")
        self.rate = rate
        self.num_updates = num_updates
        self.shadow = [p.detach().clone() for p in params if p.requires_grad]

    @torch.no_grad()
    def update(self, params) -> None:
        self.num_updates += 1
        decay = min(self.rate, (1 + self.num_updates) / (10 + self.num_updates))
        for s, p in zip(self.shadow, (p for p in params if p.requires_grad)):
            s.sub_((1.0 - decay) * (s - p.detach()))


def warmup_lr(step: int, lr: float, warmup: int) -> float:
    """score_sde's schedule: linear from 0 to lr over `warmup` steps, then constant."""
    return lr * min(step / warmup, 1.0) if warmup > 0 else lr


def make_optimizer(params, optim: dict) -> torch.optim.Optimizer:
    name = str(optim.get("optimizer", "Adam"))
    if name != "Adam":
        raise PdsError(f"optim.optimizer {name!r} is not supported; only Adam (as score_sde)")
    return torch.optim.Adam(
        params,
        lr=float(optim.get("lr", 2e-4)),
        betas=(float(optim.get("beta1", 0.9)), 0.999),
        eps=float(optim.get("eps", 1e-8)),
        weight_decay=float(optim.get("weight_decay", 0.0)),
    )


def step_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator for all draws of training step `step`: independent of where a run was resumed."""
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(seed, step))
    return g


def sample_batch(data: torch.Tensor, batch_size: int, generator: torch.Generator, *, random_flip: bool) -> torch.Tensor:
    """A batch drawn with replacement (so an epoch boundary never matters), optionally mirrored left-right."""
    idx = torch.randint(0, data.shape[0], (batch_size,), generator=generator, device=generator.device)
    x = data[idx.to(data.device)]
    if random_flip:
        flip = torch.rand(batch_size, generator=generator, device=generator.device).to(data.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainState:
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA
    step: int = 0


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    start_step: int
    seconds: float
    final_loss: float | None
    losses: list = field(default_factory=list)  # (step, mean loss since the previous log line)


def train_step(state: TrainState, data: torch.Tensor, cfg: dict, *, seed: int, batch_size: int, lr: float) -> float:
    """One optimisation step (number `state.step`) of score_sde's recipe; returns the batch loss."""
    model, optim, training = cfg["model"], cfg["optim"], cfg["training"]
    g = step_generator(seed, state.step, data.device)
    # Dropout draws from torch's global generator: seed it per step too, for exact resumes.
    torch.manual_seed(sample_seed(seed ^ 0x5EED, state.step))
    x = sample_batch(data, batch_size, g, random_flip=bool(cfg["data"].get("random_flip", False)))
    state.net.train()
    state.optimizer.zero_grad(set_to_none=True)
    loss = dsm_loss(
        state.net,
        x,
        sigma_min=float(model["sigma_min"]),
        sigma_max=float(model["sigma_max"]),
        generator=g,
        reduce_mean=bool(training.get("reduce_mean", False)),  # score_sde's default
        likelihood_weighting=bool(training.get("likelihood_weighting", False)),
    )
    loss.backward()
    for group in state.optimizer.param_groups:
        group["lr"] = warmup_lr(state.step, lr, int(optim.get("warmup", 0)))
    clip = float(optim.get("grad_clip", -1.0))
    if clip >= 0:
        torch.nn.utils.clip_grad_norm_(state.net.parameters(), max_norm=clip)
    state.optimizer.step()
    state.step += 1
    state.ema.update(state.net.parameters())
    return float(loss.detach())


# ----------------------------------------------------------------------------- checkpoints


def _strip_module(state_dict: dict) -> dict:
    """score_sde wraps the net in DataParallel, so its keys start with `module.`."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def save_training_checkpoint(path, state: TrainState) -> None:
    """The score_sde layout (`optimizer`, `model`, `ema`, `step`), and the EMA weights as safetensors beside it.

    Each file is renamed into place in one step.
    """
    try:
        save_checkpoint(path, state.net, ema_params=state.ema.shadow, optimizer_state=state.optimizer.state_dict(),
                        step=state.step)
        save_safetensors(Path(path).with_name(WEIGHTS_NAME), state.net, ema_params=state.ema.shadow, step=state.step)
    except RuntimeError as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        raise PdsError(f"cannot write {path} (is the disk full? torch.save: {first_line(e)}); "
                       "the previous checkpoint is kept") from None


def restore_training_checkpoint(raw: dict, state: TrainState, path) -> None:
    """Put what `save_training_checkpoint` wrote (read by `read_training_checkpoint`) into `state`:
    weights, Adam moments, EMA, step."""
    try:
        state.net.load_state_dict(_strip_module(raw["model"]))
        shadow = raw["ema"]["shadow_params"]
        if len(shadow) != len(state.ema.shadow):
            raise ValueError(f"{len(shadow)} EMA tensors, the model has {len(state.ema.shadow)} trainable parameters")
        device = next(state.net.parameters()).device
        state.ema.shadow = [s.to(device=device, dtype=torch.float32).clone() for s in shadow]
        state.step = int(raw["step"])
        state.ema.num_updates = state.step  # one EMA update per step, whatever the file says
        if raw.get("optimizer"):
            state.optimizer.load_state_dict(raw["optimizer"])
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        detail = first_line(e)
        raise PdsError(f"cannot resume from {path}: it is not a checkpoint of this run ({detail})") from None


def read_training_checkpoint(path, *, trust_checkpoint: bool = False) -> dict:
    """The checkpoint of a run folder as torch.load gives it; one line for an empty, truncated or foreign file."""
    raw = load_file(path, trust_checkpoint=trust_checkpoint)
    if not isinstance(raw, dict) or not all(k in raw for k in ("model", "ema", "step")):
        raise PdsError(f"cannot resume from {path}: it is not a `pds train` checkpoint (no model, ema and step)")
    return raw


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainOptions:
    """What `pds train` decides beyond the config. None = the config's value."""

    iters: int | None = None  # total optimisation steps (training.n_iters)
    batch_size: int | None = None  # training.batch_size
    lr: float | None = None  # optim.lr
    sigma_max: float | str | None = None  # model.sigma_max; "auto": the data's largest pairwise distance
    image_size: int | None = None  # data.image_size
    channels: int | None = None  # data.num_channels
    seed: int | None = None  # default 0 for a new run, the saved seed on --resume
    save_every: int | None = None  # steps between checkpoints (training.snapshot_freq_for_preemption)
    log_every: int | None = None  # steps between log records (training.log_freq)
    device: str = "cpu"
    force: bool = False
    resume: bool = False
    trust_checkpoint: bool = False  # --resume from a checkpoint that needs full unpickling

    def validate(self) -> "TrainOptions":
        """The checks that need no data and no config: fail before anything slow happens."""
        for flag, value in (("--iters", self.iters), ("--batch-size", self.batch_size), ("--image-size", self.image_size),
                            ("--save-every", self.save_every), ("--log-every", self.log_every)):
            if value is not None:
                flag_rules.whole_number(flag, value, 1)
        if self.lr is not None:
            flag_rules.positive_number("--lr", self.lr)
        if self.channels is not None and self.channels not in (1, 3):
            raise flag_rules.refusal("--channels", "1 or 3", self.channels)
        if self.sigma_max is not None and self.sigma_max != "auto" and not float(self.sigma_max) > 0:
            raise flag_rules.refusal("--sigma-max", "a positive number or auto", self.sigma_max)
        if self.force and self.resume:
            raise PdsError("--force and --resume exclude each other: --force starts over, --resume continues")
        return self


BUILTIN_CONFIG = Path(__file__).parents[1] / "data" / "digits-config.json"


def default_config(source: str, config=None, preset: str | None = None) -> dict:
    """The config a new run starts from: --config/--preset, else the built-in model's own for `digits`."""
    if config is not None or preset is not None:
        return load_config(config, preset)
    if str(source) == "digits":
        return load_config(BUILTIN_CONFIG)
    raise PdsError(
        f"pass --config FILE or --preset NAME to say what to train on {source}; "
        f"a small starting point is the built-in model's config, {BUILTIN_CONFIG}"
    )


def apply_options(cfg: dict, opts: TrainOptions) -> dict:
    """A copy of `cfg` with the flags written into it, so the saved config.json is the whole recipe."""
    cfg = copy.deepcopy(cfg)
    training, optim = cfg.setdefault("training", {}), cfg.setdefault("optim", {})
    model, data = cfg["model"], cfg["data"]
    for section, key, value in ((training, "n_iters", opts.iters), (training, "batch_size", opts.batch_size),
                                (optim, "lr", opts.lr), (data, "image_size", opts.image_size),
                                (data, "num_channels", opts.channels)):
        if value is not None:
            section[key] = value
    if opts.sigma_max is not None and opts.sigma_max != "auto":
        model["sigma_max"] = float(opts.sigma_max)
    return cfg


def data_sigma_max(data: torch.Tensor) -> float:
    """Song & Ermon's rule, sigma_max = the largest pairwise distance, rounded up to read well in config.json."""
    return float(math.ceil(max_pairwise_distance(data) * 10) / 10)


def check_trainable(cfg: dict) -> None:
    """What this trainer can do: score_sde's continuous VE objective for an NCSN++. Anything else is a user error."""
    validate_config(cfg)
    training, model = cfg.get("training", {}), cfg["model"]
    sde = str(training.get("sde", "vesde")).lower()
    if sde != "vesde":
        raise PdsError(f"training.sde is {sde!r}; `pds train` trains VE SDE models only (vesde)")
    if not training.get("continuous", True):
        raise PdsError("training.continuous is false; `pds train` trains continuous (sigma-conditioned) models only")
    if str(model.get("embedding_type")).lower() != "fourier":
        raise PdsError("model.embedding_type must be 'fourier' for a continuous VE model")
    iters, batch = int(training.get("n_iters", 0)), int(training.get("batch_size", 0))
    if iters < 1:
        raise PdsError(f"--iters (training.n_iters) must be at least 1, got {iters}")
    if batch < 1:
        raise PdsError(f"--batch-size (training.batch_size) must be at least 1, got {batch}")
    if not float(cfg.get("optim", {}).get("lr", 2e-4)) > 0:
        raise PdsError(f"--lr (optim.lr) must be positive, got {cfg['optim']['lr']}")


def run_training(source: str, cfg: dict | None, out_dir, opts: TrainOptions, *, progress=None) -> TrainResult:
    """Train on `source` (an image folder or `digits`) into `out_dir`; with opts.resume continue the run there.

    `cfg` is the nested score_sde-layout config (ignored on --resume: the run's config.json wins).
    `progress(step, total, loss, seconds)` is called after every step; None = quiet.
    """
    opts.validate()
    device = resolve_device(opts.device)
    out = Path(out_dir)
    raw = None
    if opts.resume:
        cfg, record = _resumed_setup(out, source, opts)
        # Read before the data and before anything is written: a damaged run folder is one line at once.
        raw = read_training_checkpoint(out / CHECKPOINT_NAME, trust_checkpoint=opts.trust_checkpoint)
        cfg = apply_options(cfg, TrainOptions(iters=opts.iters))  # --resume --iters N: train on to step N
    else:
        _check_new_run(out, opts)
        cfg = apply_options(cfg, opts)
        cfg["data"]["dataset"] = str(source)  # config.json records what the run trained on
        record = {"source": str(source), "seed": 0 if opts.seed is None else int(opts.seed)}
    check_trainable(cfg)
    data = load_dataset(source, size=int(cfg["data"]["image_size"]), channels=int(cfg["data"]["num_channels"]))
    if not opts.resume:
        if opts.sigma_max == "auto":
            cfg["model"]["sigma_max"] = data_sigma_max(data)
        record.update(num_images=int(data.shape[0]), sigma_max_from_data=round(max_pairwise_distance(data), 4),
                      torch_threads=torch.get_num_threads())
        prepare_out_dir(out, force=opts.force)
    state = _new_state(cfg, device, seed=int(record["seed"]))
    if raw is not None:
        restore_training_checkpoint(raw, state, out / CHECKPOINT_NAME)
    try:
        atomic_write_json(out / CONFIG_NAME, cfg)
        return _loop(state, data.to(device), cfg, out, record, opts, progress)
    except PdsError:  # fsutil.DiskFull, also an OSError, already names the file
        raise
    except OSError as e:  # a file-size limit, a folder gone: the checkpoint on disk is the last whole one
        raise PdsError(f"cannot write {e.filename or out}: {e.strerror or e}") from None



def _check_new_run(out: Path, opts: TrainOptions) -> None:
    # The cheap check before loading data: the real one (prepare_out_dir) runs just before writing.
    if out.is_dir() and any(out.iterdir()) and not opts.force:
        raise PdsError(f"output folder {out} is not empty; pass --force to start over or --resume to continue")


def _resumed_setup(out: Path, source: str, opts: TrainOptions) -> tuple[dict, dict]:
    """The saved config and run record of the run in `out`, checked against the flags."""
    if not (out / CHECKPOINT_NAME).is_file() or not (out / CONFIG_NAME).is_file():
        raise PdsError(f"nothing to resume in {out}: no {CHECKPOINT_NAME} and {CONFIG_NAME} there")
    fixed = [flag for flag, v in (("--batch-size", opts.batch_size), ("--lr", opts.lr), ("--sigma-max", opts.sigma_max)) if v is not None]
    if fixed:
        raise PdsError(f"{', '.join(fixed)}: a resumed run keeps the settings in {out / CONFIG_NAME}; start a new run to change them")
    cfg = _read_json(out / CONFIG_NAME)
    record = _read_json(out / SUMMARY_NAME) if (out / SUMMARY_NAME).is_file() else {"source": str(source), "seed": 0}
    record.setdefault("seed", 0)
    if opts.seed is not None and int(opts.seed) != int(record["seed"]):
        raise PdsError(f"--seed {opts.seed}: the run in {out} was started with seed {record['seed']}")
    if str(record.get("source")) != str(source):
        raise PdsError(f"the run in {out} trains on {record.get('source')!r}, not {str(source)!r}")
    return cfg, record


def _read_json(path: Path) -> dict:
    """A run folder's JSON file as a dict, or one line saying it is damaged."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PdsError(f"cannot resume: {path} is damaged (not JSON: {e.msg} at line {e.lineno}); "
                       "start a new run with --force") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PdsError(f"cannot resume: cannot read {path} ({first_line(e)})") from None
    if not isinstance(obj, dict):
        raise PdsError(f"cannot resume: {path} holds a JSON {type(obj).__name__}, not an object; start a new run with --force")
    return obj


def _new_state(cfg: dict, device, *, seed: int) -> TrainState:
    torch.manual_seed(seed)  # the initial weights are part of the recipe
    net = build_model(cfg).to(device)
    optimizer = make_optimizer(net.parameters(), cfg["optim"])
    return TrainState(net=net, optimizer=optimizer, ema=EMA(net.parameters(), float(cfg["model"].get("ema_rate", 0.999))))


class _LossLog:
    """DIR/log.jsonl: one record per `every` steps with the mean loss over them (what a loss curve needs)."""

    def __init__(self, path: Path, every: int, *, resume_step: int | None, seconds_before: float):
        if resume_step is not None and path.is_file():
            # Steps after the checkpoint are trained again: drop their records instead of doubling them.
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            atomic_write_text(path, "".join(ln + "\n" for ln in kept))
        # Appended to as training goes (not atomic), so opened without following a link planted at its name.
        mode = os.O_APPEND if resume_step is not None else os.O_TRUNC
        self.file = os.fdopen(open_regular(path, os.O_WRONLY | os.O_CREAT | mode, what="loss log"), "a")
        self.every, self.seconds_before = every, seconds_before
        self.window: list[float] = []
        self.records: list[tuple[int, float]] = []

    def add(self, step: int, loss: float, seconds: float, last: bool) -> None:
        self.window.append(loss)
        if step % self.every and not last:
            return
        mean = sum(self.window) / len(self.window)
        self.window.clear()
        self.records.append((step, mean))
        self.file.write(json.dumps({"step": step, "loss": mean, "seconds": round(self.seconds_before + seconds, 3)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _loop(state: TrainState, data: torch.Tensor, cfg: dict, out: Path, record: dict, opts: TrainOptions, progress) -> TrainResult:
    training = cfg["training"]
    total, batch = int(training["n_iters"]), int(training["batch_size"])
    lr = float(cfg["optim"].get("lr", 2e-4))
    save_every = int(opts.save_every or training.get("snapshot_freq_for_preemption", 1000))
    start, seed = state.step, int(record["seed"])
    seconds_before = float(record.get("seconds", 0.0)) if opts.resume else 0.0
    log = _LossLog(out / LOG_NAME, int(opts.log_every or training.get("log_freq", 50)),
                   resume_step=start if opts.resume else None, seconds_before=seconds_before)
    t0 = time.perf_counter()

    def save() -> None:
        save_training_checkpoint(out / CHECKPOINT_NAME, state)
        record.update(step=state.step, iters=total, batch_size=batch, seconds=round(seconds_before + time.perf_counter() - t0, 2),
                      final_loss=log.records[-1][1] if log.records else record.get("final_loss"))
        atomic_write_json(out / SUMMARY_NAME, record)

    try:
        while state.step < total:
            loss = train_step(state, data, cfg, seed=seed, batch_size=batch, lr=lr)
            if not math.isfinite(loss):
                raise PdsError(f"the loss became {loss} at step {state.step}; lower --lr (or check the data)")
            seconds = time.perf_counter() - t0
            log.add(state.step, loss, seconds, last=state.step == total)
            if progress is not None:
                progress(state.step, total, loss, seconds)
            if state.step % save_every == 0 and state.step < total:
                save()
        if state.step > start or not (out / SUMMARY_NAME).exists():
            save()
    finally:
        log.close()
    return TrainResult(out_dir=out, step=state.step, start_step=start, seconds=time.perf_counter() - t0,
                       final_loss=log.records[-1][1] if log.records else None, losses=log.records)


# ----------------------------------------------------------------------------- shipping a model


def export_ema_weights(checkpoint, config, dst) -> dict:
    """A sampling-only copy of a training checkpoint: the EMA weights as one plain state_dict.

    What score_sde samples with (EMA shadows for the trainable parameters, the Fourier `W` and
    buffers from `model`), without the raw weights, the Adam moments and a second copy in an
    `ema` list: a quarter of the training checkpoint. `load_score_model` reads a plain
    state_dict as it is. Returns {"step", "num_params", "bytes"}.
    """
    net = load_score_model(checkpoint, config, weights="ema", device="cpu")
    if net.checkpoint_info["weights"] != "ema":
        raise PdsError(f"{checkpoint} holds no EMA weights")
    weights = {k: v.detach().clone() for k, v in net.state_dict().items()}
    try:
        with atomic_path(dst) as tmp:
            torch.save(weights, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        raise PdsError(f"cannot write {dst}: {first_line(e)}") from None
    return {"step": net.checkpoint_info["step"], "num_params": net.checkpoint_info["num_params"],
            "bytes": Path(dst).stat().st_size}

"""NCSN++ in diffusers' format: `UNet2DModel` (the Skip blocks) + `ScoreSdeVeScheduler`, both ways.

The official score_sde weights on the Hugging Face Hub (google/ncsnpp-ffhq-1024, ...) are
diffusers pipelines: a `UNet2DModel` config and weights, a `ScoreSdeVeScheduler` config and a
`model_index.json`, either flat at the top (2022 layout) or in `unet/` and `scheduler/`.
diffusers' Skip blocks compute score_sde's NCSN++ (biggan resblocks, FIR [1,3,3,1], output_skip,
input_skip, sum, Fourier embedding with the output divided by sigma), so every such model is
one pds config plus a renaming of its weights:

- config: `config_from_diffusers` / `config_to_diffusers` (one line of refusal for what the
  other side cannot express);
- weights: `key_map` pairs each score_sde key (`all_modules.<i>...`, in construction order)
  with its diffusers name; attention projections are score_sde `NIN` (W [in, out]) against
  `nn.Linear` (weight [out, in]), so they are transposed. The `sigmas` buffer is recomputed.
- folders: `locate_folder` finds config, weights and scheduler in a model or pipeline folder,
  `hub_folder` fetches `hf:ORG/NAME[@REVISION]` through huggingface_hub's cache,
  `write_pipeline` writes a pipeline folder atomically.

One difference in semantics is kept on score_sde's side: diffusers builds some GroupNorms with
other group counts (attention norms at 32 groups; `min(a + b // 4, 32)` in the up-block resnets
of `AttnSkipUpBlock2D`). They agree whenever attention levels have >= 128 channels, as in every
official model; otherwise `group_count_differences` says where diffusers computes differently.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pdscli.errors import PdsError, first_line
from pdscli.fsutil import DiskFull, atomic_write_bytes, is_disk_full
from pdscli.models.ncsnpp import NCSNpp, sigma_ladder

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
UNET_CLASS, SCHEDULER_CLASS, PIPELINE_CLASS = "UNet2DModel", "ScoreSdeVeScheduler", "ScoreSdeVePipeline"
# The diffusers release this format was checked against; written into exported configs.
DIFFUSERS_VERSION = "0.42.1"
# ScoreSdeVeScheduler's own defaults: what diffusers uses for a model folder without a scheduler config.
SCHEDULER_DEFAULTS = {"num_train_timesteps": 2000, "snr": 0.15, "sigma_min": 0.01, "sigma_max": 1348.0,
                      "sampling_eps": 1e-5, "correct_steps": 1}
HUB_PREFIX = "hf:"

_DOWN = {False: "SkipDownBlock2D", True: "AttnSkipDownBlock2D"}
_UP = {False: "SkipUpBlock2D", True: "AttnSkipUpBlock2D"}
_ACT = {"silu": "swish", "swish": "swish"}
_RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj", "GroupNorm_1": "norm2",
           "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
_ATTN = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v", "NIN_3": "to_out.0"}
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PARAM = {"W": "weight", "b": "bias", "weight": "weight", "bias": "bias"}
# What diffusers' Skip blocks hard-code, as pds config fields.
IMPLIED = {"resblock_type": "biggan", "fir": True, "fir_kernel": [1, 3, 3, 1], "progressive": "output_skip",
           "progressive_input": "input_skip", "progressive_combine": "sum", "conditional": True,
           "embedding_type": "fourier", "scale_by_sigma": True, "skip_rescale": True}


# ---------------------------------------------------------------------------- configs

MAX_LAYERS_PER_BLOCK = 64  # score_sde's deepest is 8; 10^5 made pds info build modules for minutes
MAX_TIMESTEPS = 1_000_000  # its noise ladder is a float64 array of this length


@dataclass(frozen=True)
class Field:
    """What a config field may hold: `kind` "int", "number" or "bool"; bounds inclusive; `null` allowed."""

    kind: str
    low: float | None = None
    high: float | None = None
    null: bool = False
    low_open: bool = False  # low itself excluded

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.null else "null"
        if self.kind == "bool":
            return None if isinstance(value, bool) else "not true or false"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "not a number"
        if self.kind == "int" and not isinstance(value, int):
            return "not a whole number"
        if not math.isfinite(value):
            return "not finite"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"{'at most' if self.low_open else 'below'} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"above {self.high:g}"
        return None


UNET_FIELDS = {
    "layers_per_block": Field("int", 1, MAX_LAYERS_PER_BLOCK), "norm_eps": Field("number", 0, low_open=True),
    "dropout": Field("number", 0, 1), "mid_block_scale_factor": Field("number"), "in_channels": Field("int", 1),
    "out_channels": Field("int", 1), "norm_num_groups": Field("int", 1, null=True),
    "attention_head_dim": Field("int", 1, null=True), "time_embedding_dim": Field("int", 1, null=True),
    "center_input_sample": Field("bool"),
}
SCHEDULER_FIELDS = {
    "num_train_timesteps": Field("int", 1, MAX_TIMESTEPS), "sigma_min": Field("number", 0, low_open=True),
    "sigma_max": Field("number", 0, low_open=True), "snr": Field("number", 0, low_open=True),
    "sampling_eps": Field("number", 0, 1, low_open=True), "correct_steps": Field("int", 0, 100),
}


def check_schema(cfg: dict, fields: dict[str, Field], source: str) -> None:
    """One line naming the first field whose value has the wrong type or range (absent fields take defaults)."""
    for name, spec in fields.items():
        if name in cfg:
            problem = spec.problem(cfg[name])
            if problem:
                raise PdsError(f"{source}: {name} is {json.dumps(cfg[name])} ({problem}); it takes "
                               f"{_describe(spec)}")


def _describe(spec: Field) -> str:
    kind = {"int": "a whole number", "number": "a number", "bool": "true or false"}[spec.kind]
    if spec.low is not None and spec.high is not None:
        kind += f" from {spec.low:g} to {spec.high:g}"
    elif spec.low is not None:
        kind += f" {'above' if spec.low_open else 'of at least'} {spec.low:g}"
    return kind + (" or null" if spec.null else "")



def _groups(channels: int) -> int:
    return min(channels // 4, 32)  # score_sde's (and pds's) GroupNorm


def config_from_diffusers(unet: dict, scheduler: dict | None, source: str) -> tuple[dict, list[str]]:
    """(pds config, warnings) for a UNet2DModel config and a ScoreSdeVeScheduler config (None: its defaults)."""

    def refuse(reason: str):
        raise PdsError(f"{source}: {reason}; pds reads diffusers' NCSN++ (UNet2DModel with the Skip blocks, "
                       f"as in google/ncsnpp-*)")

    if unet.get("_class_name", UNET_CLASS) != UNET_CLASS:
        refuse(f"the model is a {unet['_class_name']}, not a {UNET_CLASS}")
    check_schema(unet, UNET_FIELDS, source)
    check_schema(scheduler or {}, SCHEDULER_FIELDS, source)
    if unet.get("time_embedding_type") != "fourier":
        refuse(f"time_embedding_type is {unet.get('time_embedding_type')!r}, not 'fourier'")
    down, up = list(unet.get("down_block_types") or []), list(unet.get("up_block_types") or [])
    boc = list(unet.get("block_out_channels") or [])
    if not down or len(down) != len(up) or len(down) != len(boc):
        refuse("down_block_types, up_block_types and block_out_channels must have the same length")
    attn = [d == _DOWN[True] for d in down]
    if any(d not in _DOWN.values() for d in down) or up != [_UP[a] for a in reversed(attn)]:
        refuse(f"block types {down} / {up} are not the Skip blocks (down {list(_DOWN.values())}, up their mirror)")
    nf = boc[0]
    if not all(isinstance(c, int) and c > 0 and c % nf == 0 for c in boc):
        refuse(f"block_out_channels {boc} are not multiples of the first")
    size = unet.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            refuse(f"sample_size {size} is not square")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        refuse(f"sample_size {size!r} is not an image side")
    if unet.get("in_channels", 3) != 3 or unet.get("out_channels", 3) != 3:
        refuse("in_channels and out_channels must be 3 (the Skip blocks hard-code RGB)")
    act = _ACT.get(str(unet.get("act_fn", "silu")))
    if act is None:
        refuse(f"act_fn {unet.get('act_fn')!r} is not silu (the Skip blocks' heads are SiLU)")
    if not math.isclose(float(unet.get("mid_block_scale_factor", 1.0)), math.sqrt(2), rel_tol=1e-6):
        refuse("mid_block_scale_factor is not sqrt(2) (score_sde rescales every skip sum)")
    if not math.isclose(float(unet.get("norm_eps", 1e-5)), 1e-6, rel_tol=1e-6):
        refuse(f"norm_eps is {unet.get('norm_eps', 1e-5)}, not 1e-6")
    for name, default in (("class_embed_type", None), ("num_class_embeds", None), ("attn_norm_num_groups", None),
                          ("resnet_time_scale_shift", "default"), ("mid_block_type", "UNetMidBlock2D"),
                          ("add_attention", True)):
        if unet.get(name, default) != default:
            refuse(f"{name} is {unet[name]!r}, not {default!r}")
    if unet.get("time_embedding_dim") not in (None, 4 * nf):
        refuse(f"time_embedding_dim is {unet['time_embedding_dim']}, not 4 x block_out_channels[0]")
    # Absent fields take UNet2DModel's defaults (norm_num_groups 32, attention_head_dim 8), as in diffusers.
    groups = unet.get("norm_num_groups", 32)
    if groups is not None and (groups != _groups(boc[-1]) or groups != _groups(nf)):
        refuse(f"norm_num_groups {groups} differs from score_sde's min(C // 4, 32) in the middle block or the output")
    # One policy for attention: pds computes NCSN++'s single head, so every config for which
    # diffusers computes several heads is refused, an absent field (diffusers' default, heads of 8
    # channels) as much as an explicit head size below the channel count.
    if "attention_head_dim" not in unet:
        refuse("attention_head_dim is absent, so diffusers splits attention into heads of 8 channels; pds computes "
               "NCSN++'s single head: set it to null if the model was trained single-head (as score_sde's were)")
    heads = unet["attention_head_dim"]
    if heads is not None and any(heads != c for c, a in zip(boc + [boc[-1]], attn + [True]) if a):
        refuse(f"attention_head_dim {heads} makes multi-head attention; pds computes NCSN++'s single head")
    early = []

    sched = dict(SCHEDULER_DEFAULTS, **(scheduler or {}))
    if sched.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        raise PdsError(f"{source}: the scheduler is a {sched['_class_name']}, not a {SCHEDULER_CLASS}")
    warnings = early if scheduler is not None else early + [
        f"{source}: no scheduler config; using {SCHEDULER_CLASS}'s defaults (sigma {SCHEDULER_DEFAULTS['sigma_min']:g}"
        f" .. {SCHEDULER_DEFAULTS['sigma_max']:g}, {SCHEDULER_DEFAULTS['num_train_timesteps']} steps, snr "
        f"{SCHEDULER_DEFAULTS['snr']:g})"]
    if not math.isclose(float(sched["sampling_eps"]), SCHEDULER_DEFAULTS["sampling_eps"], rel_tol=1e-9):
        warnings.append(f"{source}: sampling_eps {sched['sampling_eps']:g} is not used: pds's reference grid ends at "
                        "t = 1e-5 x num_scales / steps, as score_sde's (README, Weights from the Hugging Face Hub)")
    correct = int(sched["correct_steps"])  # the pipeline's Langevin steps before each predictor step
    cfg = {
        "model": {"name": "ncsnpp", **IMPLIED, "nf": nf, "ch_mult": [c // nf for c in boc],
                  "num_res_blocks": int(unet.get("layers_per_block", 2)),
                  "attn_resolutions": [size // 2**i for i, a in enumerate(attn) if a],
                  "dropout": float(unet.get("dropout", 0.0)), "nonlinearity": act, "normalization": "GroupNorm",
                  "attention_type": "ddpm", "resamp_with_conv": True, "init_scale": 0.0, "fourier_scale": 16,
                  "conv_size": 3, "sigma_min": float(sched["sigma_min"]), "sigma_max": float(sched["sigma_max"]),
                  "num_scales": int(sched["num_train_timesteps"]), "ema_rate": 0.9999},
        "data": {"image_size": size, "num_channels": 3, "centered": not unet.get("center_input_sample", False)},
        "sampling": {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin" if correct else "none",
                     "n_steps_each": max(correct, 1), "snr": float(sched["snr"])},
        "training": {"sde": "vesde", "continuous": True},
    }
    differences = group_count_differences(cfg)
    if differences:
        warnings.append(f"{source}: diffusers itself computes {len(differences)} GroupNorm(s) of this model with "
                        f"other group counts than score_sde ({differences[0]}; attention levels under 128 "
                        f"channels); pds computes score_sde's")
    return cfg, warnings


def exportable(cfg: dict) -> str | None:
    """Why diffusers cannot express this config (None if it can)."""
    m, data = cfg["model"], cfg["data"]
    for name, value in IMPLIED.items():
        given = m.get(name)
        if (given.lower() if isinstance(given, str) else given) != value and not (
                name == "fir_kernel" and list(given or []) == value):
            return f"model.{name} is {given!r}; diffusers' NCSN++ blocks have {value!r}"
    if str(m["nonlinearity"]).lower() != "swish":
        return f"model.nonlinearity is {m['nonlinearity']!r}; diffusers' NCSN++ blocks use swish (SiLU)"
    if data["num_channels"] != 3:
        return f"data.num_channels is {data['num_channels']}; diffusers' NCSN++ blocks hard-code 3"
    return None


def config_to_diffusers(cfg: dict) -> tuple[dict, dict]:
    """(UNet2DModel config, ScoreSdeVeScheduler config) for a config `exportable` accepts."""
    why = exportable(cfg)
    if why:
        raise PdsError(f"cannot export to diffusers: {why}")
    m, data = cfg["model"], cfg["data"]
    nf, size = m["nf"], data["image_size"]
    attn = [size // 2**i in m["attn_resolutions"] for i in range(len(m["ch_mult"]))]
    unet = {
        "_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": size, "in_channels": 3, "out_channels": 3,
        "center_input_sample": not data["centered"], "time_embedding_type": "fourier",
        "flip_sin_to_cos": True, "freq_shift": 1,  # unused by the Fourier embedding
        "down_block_types": [_DOWN[a] for a in attn], "up_block_types": [_UP[a] for a in reversed(attn)],
        "block_out_channels": [nf * c for c in m["ch_mult"]], "layers_per_block": m["num_res_blocks"],
        "mid_block_scale_factor": math.sqrt(2), "downsample_padding": 1, "dropout": float(m["dropout"]),
        "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": None, "norm_eps": 1e-6,
    }
    scheduler = {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
                 "num_train_timesteps": int(m["num_scales"]), "sigma_min": float(m["sigma_min"]),
                 "sigma_max": float(m["sigma_max"]), "snr": float(cfg["sampling"]["snr"]),
                 "sampling_eps": 1e-5, "correct_steps": 1}
    return unet, scheduler


def unbuildable(cfg: dict) -> str | None:
    """Why diffusers cannot even build this config's UNet2DModel (None if it can): a GroupNorm
    whose channels its group count does not divide, from the group counts diffusers hard-codes
    (32 in the attention norms, min(a + b // 4, 32) in AttnSkipUpBlock2D's resnets)."""
    for name, groups, channels in _diffusers_norms(cfg):
        if channels % groups:
            return (f"diffusers would build {name} as GroupNorm({groups} groups) over {channels} channels, which it "
                    f"cannot (the channels must divide into the groups): attention levels need channel counts "
                    f"diffusers can split (multiples of 32; at least 128 to compute as score_sde)")
    return None


def _diffusers_norms(cfg: dict):
    """(name, diffusers' group count, channels) of the GroupNorms diffusers sizes its own way."""
    m = cfg["model"]
    nf, size, levels, r = m["nf"], cfg["data"]["image_size"], len(m["ch_mult"]), m["num_res_blocks"]
    ch = [nf * c for c in m["ch_mult"]]
    attn = [size // 2**i in m["attn_resolutions"] for i in range(levels)]
    for level in range(levels):
        if attn[level]:
            for j in range(r):
                yield f"down_blocks.{level}.attentions.{j}.group_norm", 32, ch[level]
    for u in range(levels):
        level = levels - 1 - u
        if not attn[level]:
            continue  # SkipUpBlock2D computes min((a + b) // 4, 32), as score_sde
        prev = ch[min(level + 1, levels - 1)]
        for j in range(r + 1):
            res_in = prev if j == 0 else ch[level]
            res_skip = ch[max(level - 1, 0)] if j == r else ch[level]
            # diffusers' expression, precedence included: min(res_in + res_skip // 4, 32)
            yield f"up_blocks.{u}.resnets.{j}.norm1", min(res_in + res_skip // 4, 32), res_in + res_skip
        yield f"up_blocks.{u}.attentions.0.group_norm", 32, ch[level]


def group_count_differences(cfg: dict) -> list[str]:
    """Where diffusers' GroupNorms (built from this config) have other group counts than score_sde's."""
    return [f"{name}: {groups} groups, score_sde {_groups(channels)}"
            for name, groups, channels in _diffusers_norms(cfg) if groups != _groups(channels)]


# ---------------------------------------------------------------------------- weights


def _module_names(model: NCSNpp) -> dict[int, tuple[str, str]]:
    """{index in all_modules: (diffusers prefix, kind)} for a model `exportable` accepts."""
    index = {id(module): i for i, module in enumerate(model.all_modules)}
    names: dict[int, tuple[str, str]] = {}

    def put(module, prefix: str, kind: str = "plain") -> None:
        names[index[id(module)]] = (prefix, kind)

    parts = model.parts
    put(parts.fourier, "time_proj", "fourier")
    put(parts.time_mlp[0], "time_embedding.linear_1")
    put(parts.time_mlp[1], "time_embedding.linear_2")
    put(parts.conv_in, "conv_in")
    for i, level in enumerate(parts.down_levels):
        for j, (block, attn) in enumerate(level.blocks):
            put(block, f"down_blocks.{i}.resnets.{j}", "resnet")
            if attn is not None:
                put(attn, f"down_blocks.{i}.attentions.{j}", "attn")
        if level.downsample is not None:
            put(level.downsample, f"down_blocks.{i}.resnet_down", "resnet")
            put(level.pyramid, f"down_blocks.{i}.skip_conv", "combine")
    for prefix, module in zip(("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"), parts.mid):
        put(module, prefix, "attn" if "attentions" in prefix else "resnet")
    for u, level in enumerate(parts.up_levels):
        for j, block in enumerate(level.blocks):
            put(block, f"up_blocks.{u}.resnets.{j}", "resnet")
        if level.attn is not None:
            put(level.attn, f"up_blocks.{u}.attentions.0", "attn")
        if level.upsample is not None:
            put(level.head_norm, f"up_blocks.{u}.skip_norm")
            put(level.head_conv, f"up_blocks.{u}.skip_conv")
            put(level.upsample, f"up_blocks.{u}.resnet_up", "resnet")
        else:  # the finest level's head is the model's output head in diffusers
            put(level.head_norm, "conv_norm_out")
            put(level.head_conv, "conv_out")
    if len(names) != len(model.all_modules):
        raise PdsError("this NCSN++ has modules diffusers' blocks do not have")
    return names


def key_map(model: NCSNpp) -> "OrderedDict[str, tuple[str, bool]]":
    """{score_sde key: (diffusers key, transposed)} for every weight (not the `sigmas` buffer), in pds order."""
    names = _module_names(model)
    out = OrderedDict()
    for key in model.state_dict():
        if key == "sigmas":
            continue
        _, i, rest = key.split(".", 2)  # all_modules.<i>.<rest>
        prefix, kind = names[int(i)]
        owner, _, param = rest.rpartition(".")
        if kind in ("resnet", "attn"):
            sub = (_RESNET if kind == "resnet" else _ATTN)[owner]
            out[key] = (f"{prefix}.{sub}.{_PARAM[param]}", kind == "attn" and param == "W")
        else:  # plain modules, the Fourier W, Combine.Conv_0
            out[key] = (f"{prefix}.{_PARAM[param]}", False)
    return out


def _normalize_names(state_dict: dict) -> dict:
    """Older diffusers files: attention query/key/value/proj_attn, and time_proj.W beside (or for) .weight."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if ".attentions." in f".{key}" and len(parts) >= 2 and parts[-2] in _OLD_ATTN:
            key = ".".join(parts[:-2] + [_OLD_ATTN[parts[-2]], parts[-1]])
        if key == "time_proj.W":
            if "time_proj.weight" in state_dict:
                continue  # the same tensor under both names
            key = "time_proj.weight"
        out[key] = value
    return out


def _count_list(items: list[str], what: str) -> str:
    return f"{len(items)} {what} ({', '.join(items[:2])}{', ...' if len(items) > 2 else ''})"


def state_dict_from_diffusers(state_dict: dict, model: NCSNpp, source: str) -> "OrderedDict[str, torch.Tensor]":
    """The score_sde state_dict (keys without "module.", `sigmas` recomputed) of a diffusers one."""
    given = _normalize_names(state_dict)
    mapping = key_map(model)
    expected = model.state_dict()
    wanted = {name for name, _ in mapping.values()}
    missing = [name for name, _ in mapping.values() if name not in given]
    unexpected = [k for k in given if k not in wanted]
    if missing or unexpected:
        found = "; ".join(_count_list(items, what) for items, what in ((missing, "missing"), (unexpected, "unexpected"))
                          if items)
        raise PdsError(f"{source}: the weights do not fit the model its config describes: {found}")
    out = OrderedDict()
    for key, value in expected.items():
        if key == "sigmas":
            m = model.config["model"]
            out[key] = torch.tensor(sigma_ladder(m["sigma_min"], m["sigma_max"], m["num_scales"]), dtype=torch.float64)
            continue
        name, transposed = mapping[key]
        if not given[name].is_floating_point():
            raise PdsError(f"{source}: {name} holds {str(given[name].dtype).removeprefix('torch.')} values; "
                           "a network's weights are floating point (a damaged or foreign file)")
        tensor = given[name].t() if transposed and given[name].ndim == 2 else given[name]
        if tuple(tensor.shape) != tuple(value.shape):
            raise PdsError(f"{source}: {name} is {list(given[name].shape)} but the config makes it "
                           f"{list(value.t().shape) if transposed else list(value.shape)}")
        out[key] = tensor
    return out


def state_dict_to_diffusers(model: NCSNpp) -> "OrderedDict[str, torch.Tensor]":
    """The model's weights under diffusers' names: float32, CPU, contiguous, no shared storage."""
    state = model.state_dict()
    out = OrderedDict()
    for key, (name, transposed) in key_map(model).items():
        tensor = state[key].detach().to("cpu", torch.float32)
        out[name] = (tensor.t() if transposed else tensor).contiguous().clone()
    return out


def looks_like_diffusers(state_dict: dict) -> bool:
    return "conv_in.weight" in state_dict and not any(k.startswith(("all_modules.", "module.")) for k in state_dict)


# ---------------------------------------------------------------------------- folders


@dataclass
class DiffusersFolder:
    """Where a diffusers model's parts are. `scheduler` is None when no scheduler config was found."""

    root: Path
    weights: Path
    unet_config: dict
    scheduler: dict | None
    layout: str  # "diffusers-pipeline" (unet/ + scheduler/), "diffusers-flat" (2022), "diffusers-model"
    config_path: Path


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise PdsError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise PdsError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, dict):
        raise PdsError(f"{path} does not hold a JSON object")
    return value


def is_unet_config(cfg: dict) -> bool:
    return cfg.get("_class_name") == UNET_CLASS or "block_out_channels" in cfg


def _component(index: dict, cls: str, source: Path) -> str | None:
    """The component name model_index.json gives a class ("unet"; "model" in older files): a
    folder inside the pipeline, never a path (`../..`, `/abs`) that leads out of it."""
    for name, value in index.items():
        if isinstance(value, list) and len(value) == 2 and value[1] == cls:
            if not re.fullmatch(r"[\w][\w.-]*", name) or name in (".", ".."):
                raise PdsError(f"{source} names the {cls} folder {name!r}, which is not a folder inside the "
                               "pipeline; pds reads a pipeline's parts from its own subfolders")
            return name
    return None


def _inside(path: Path, root: Path, within: Path) -> Path:
    """`path` (under `root`) if it does not lead, through links, outside `within` (root itself, or
    the Hub cache's repo folder whose blobs a snapshot's links point to)."""
    if os.path.lexists(path) and not path.resolve().is_relative_to(within.resolve()):
        raise PdsError(f"{path} leads outside {root} (to {path.resolve()}); pds reads a model folder's config, "
                       "weights and scheduler only from inside it: copy the files in")
    return path


def weights_in(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def locate_folder(root: Path, *, within: Path | None = None) -> DiffusersFolder:
    """The parts of a diffusers model folder or pipeline folder (flat or with unet/ + scheduler/),
    all inside `within` (default: `root`) whatever links the folder holds."""
    within = within or root
    index_path = _inside(root / "model_index.json", root, within)
    index = read_json(index_path) if index_path.is_file() else {}
    unet_name = _component(index, UNET_CLASS, index_path) or "unet"
    sched_name = _component(index, SCHEDULER_CLASS, index_path) or "scheduler"
    for name in {unet_name, sched_name}:
        _inside(root / name, root, within)
    if (root / unet_name / "config.json").is_file():
        model_dir, layout = root / unet_name, "diffusers-pipeline"
        sched_paths = [root / sched_name / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        model_dir, layout = root, "diffusers-flat" if index else "diffusers-model"
        # A model folder inside a pipeline (unet/) finds its scheduler beside it.
        sched_paths = [root / "scheduler_config.json", root.parent / "scheduler" / "scheduler_config.json"]
    else:
        hint = " (pass the checkpoint file inside it)" if any(root.glob("*.pth")) else ""
        raise PdsError(f"checkpoint {root} is a folder but not a diffusers model or pipeline folder: it has no "
                       f"config.json or unet/config.json{hint}")
    config_path = _inside(model_dir / "config.json", root, within)
    unet = read_json(config_path)
    if not is_unet_config(unet):
        pth = " (a pds/score_sde config: pass the .pth file with --config)" if "model" in unet else ""
        raise PdsError(f"{config_path} is not a diffusers {UNET_CLASS} config{pth}")
    weights = weights_in(model_dir)
    if weights is None:
        sharded = any(model_dir.glob("*.index.json"))
        raise PdsError(f"{model_dir} has no {' or '.join(WEIGHT_FILES)}"
                       + (" (sharded weights are not supported)" if sharded else ""))
    _inside(weights, root, within)
    sched_path = next((p for p in sched_paths if p.is_file()), None)
    if sched_path is not None:  # a model folder's own, or its pipeline's beside it (unet/../scheduler/)
        beside = within == root and sched_path.parent.parent == root.parent and sched_path.parent != root
        _inside(sched_path, root, root.parent if beside else within)
    scheduler = read_json(sched_path) if sched_path else None
    return DiffusersFolder(root, weights, unet, scheduler, layout, config_path)


# ---------------------------------------------------------------------------- the Hub


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """"hf:ORG/NAME[@REVISION]" -> (repo id, revision or None)."""
    body = spec[len(HUB_PREFIX):]
    repo, _, revision = body.partition("@")
    names_ok = re.fullmatch(r"[\w.-]+/[\w.-]+", repo) and not any(p.startswith(".") for p in repo.split("/"))
    if not names_ok or "@" in revision or (_ and not revision):
        raise PdsError(f"{spec!r} is not a Hub model; write hf:ORG/NAME or hf:ORG/NAME@REVISION "
                       f"(e.g. hf:google/ncsnpp-ffhq-1024)")
    return repo, revision or None


_JSON_FILES = ["model_index.json", "config.json", "scheduler_config.json", "*/config.json",
               "*/scheduler_config.json"]


def hub_folder(spec: str) -> Path:
    """The local snapshot folder of `hf:ORG/NAME[@REVISION]`, downloaded into huggingface_hub's cache if needed.

    huggingface_hub does the work, so its settings hold: HF_HOME / HF_HUB_CACHE, HF_TOKEN or a
    stored login, HF_HUB_OFFLINE (cache only). Only the configs and one weights file are fetched:
    safetensors if the repo has it, else the .bin.
    """
    repo, revision = parse_hub_spec(spec)
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise PdsError(f"{spec} needs huggingface_hub: pip install huggingface_hub") from None
    offline = bool(constants.HF_HUB_OFFLINE)
    cached = _cached_snapshot(huggingface_hub, repo, revision)
    if cached is not None:
        return cached
    _bound_hub_calls(huggingface_hub.get_session(), float(constants.HF_HUB_ETAG_TIMEOUT))

    def fetch(patterns: list[str]) -> Path:
        return Path(huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=patterns,
                                                      local_files_only=offline,
                                                      etag_timeout=float(constants.HF_HUB_ETAG_TIMEOUT)))

    try:
        folder = fetch(_JSON_FILES + [f"*{WEIGHT_FILES[0]}"])
        if not _has_weights(folder):
            folder = fetch(_JSON_FILES + [f"*{WEIGHT_FILES[1]}"])
    except Exception as e:  # huggingface_hub's errors, named below; anything else says the same to a user
        raise PdsError(_hub_message(spec, repo, e, offline)) from None
    return folder


def _bound_hub_calls(session, seconds: float) -> None:
    """huggingface_hub's calls pass timeout=None (e.g. repo_info), so a server that accepts and never
    answers hangs them. A request hook on its shared client gives every phase a timeout instead:
    huggingface_hub's own HF_HUB_ETAG_TIMEOUT (10 s unless set)."""

    def bound(request) -> None:
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {phase: min(given.get(phase) or seconds, seconds)
                                         for phase in ("connect", "read", "write", "pool")}

    hooks = session.event_hooks
    if not any(getattr(h, "__name__", "") == bound.__name__ for h in hooks["request"]):
        session.event_hooks = {**hooks, "request": [*hooks["request"], bound]}


def _cached_snapshot(huggingface_hub, repo: str, revision: str | None) -> Path | None:
    """The snapshot already in huggingface_hub's cache with a config and weights, else None: a
    cached model opens without asking the Hub anything (as HF_HUB_OFFLINE would)."""
    try:
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, local_files_only=True,
                                                        allow_patterns=_JSON_FILES + [f"*{w}" for w in WEIGHT_FILES]))
    except Exception:  # not cached (LocalEntryNotFoundError and kin): ask the Hub
        return None
    return folder if _has_weights(folder) else None


def _has_weights(folder: Path) -> bool:
    return any(weights_in(d) is not None for d in (folder, *(p for p in folder.iterdir() if p.is_dir())))


def _hub_message(spec: str, repo: str, error: Exception, offline: bool) -> str:
    kind = type(error).__name__
    name = repo.split("/")[1]
    local = (f"fetch it where the Hub is reachable (hf download {repo} --local-dir {name}) and pass "
             f"--checkpoint {name} (a local diffusers folder)")
    if kind in ("GatedRepoError",) or getattr(getattr(error, "response", None), "status_code", None) == 401:
        return f"{spec}: the Hub refused access ({kind}); log in (hf auth login) or set HF_TOKEN"
    if kind == "RepositoryNotFoundError":
        return f"{spec}: no such model on the Hub (or it is private: set HF_TOKEN)"
    if kind == "RevisionNotFoundError":
        return f"{spec}: the model has no such revision"
    if offline or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "IncompleteSnapshotError"):
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub cannot be reached"
        return f"{spec} is not in the Hugging Face cache and {why}; {local}"
    detail = first_line(error, 200)
    return f"cannot fetch {spec} ({detail}); {local}"


# ---------------------------------------------------------------------------- writing


PIPELINE_FILES = ("model_index.json", "unet/config.json", f"unet/{WEIGHT_FILES[0]}", "scheduler/scheduler_config.json")


def write_pipeline(out: Path, model: NCSNpp, *, force: bool = False, check: Callable[[Path], None] | None = None) -> dict:
    """Write `model` as a ScoreSdeVePipeline folder (unet/ + scheduler/, safetensors), atomically.

    Everything goes into a temporary folder beside `out` (named with this process's id, so that
    a later export removes what a killed one left), which then takes `out`'s place in one step.
    An existing `out` is replaced only with `force`, and only if it holds nothing but a pipeline's
    files: nothing a user keeps there is deleted. A full disk is one line (DiskFull).
    `check(folder)` runs on the finished temporary folder first; raising there writes nothing.
    Returns {"path", "files", "size_bytes", "warnings"}.
    """
    from safetensors.torch import save as safetensors_bytes

    out = Path(out)
    unet_cfg, sched_cfg = config_to_diffusers(model.config)
    check_pipeline_out(out, force=force)
    remove_stale_exports(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(out) from None
        raise PdsError(f"cannot write beside {out}: {e.strerror}") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
                 "scheduler": ["diffusers", SCHEDULER_CLASS], "unet": ["diffusers", UNET_CLASS]}
        weights = safetensors_bytes(state_dict_to_diffusers(model), metadata={"format": "pt"})
        contents = dict(zip(PIPELINE_FILES, [_json_bytes(index), _json_bytes(unet_cfg), weights, _json_bytes(sched_cfg)]))
        for name, data in contents.items():
            (tmp / name).parent.mkdir(exist_ok=True)
            atomic_write_bytes(tmp / name, data)
        if check is not None:
            check(tmp)
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {"path": str(out), "files": files, "size_bytes": sum((out / f).stat().st_size for f in files),
            "warnings": [f"diffusers computes {len(d)} GroupNorm(s) of this model differently from pds ({d[0]})"
                         for d in [group_count_differences(model.config)] if d]}


def check_pipeline_out(out: Path, *, force: bool) -> None:
    """Before any work: `out` may be made, or (with `force`) replaced as a whole because it holds
    only what an export wrote. The current folder or one above it cannot take a new folder's place."""
    here = Path.cwd().resolve()
    if out.name in ("", ".", "..") or here.is_relative_to(out.resolve()):
        raise PdsError(f"--out {out} is the current folder or above it; an export replaces its folder as a whole: "
                       "name a new folder, e.g. --out ncsnpp-diffusers")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise PdsError(f"{out} exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise PdsError(f"{out} exists and is not a folder" + (" (a symbolic link)" if out.is_symlink() else ""))
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if str(p.relative_to(out)) not in {*PIPELINE_FILES, "unet", "scheduler"})
    if foreign:
        raise PdsError(f"--force replaces only a pipeline folder pds wrote, and {out} also holds {foreign[0]}"
                       f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}; move them out, or use "
                       "another --out")


def remove_stale_exports(out: Path) -> list[Path]:
    """Remove the temporary folders (`.NAME.PID.*.tmp`, `.NAME.PID.*.old`) that killed exports to
    `out` left beside it: those whose process is gone. Returns the folders removed."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(\d+)\.\w+\.(tmp|old)$")
    parent = out.parent if out.parent.is_dir() else None
    for p in parent.iterdir() if parent else ():
        m = pattern.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode("utf-8")


def _replace_folder(tmp: Path, out: Path) -> None:
    """`tmp` takes `out`'s place. An existing `out` is swapped with `tmp` in one step where the
    kernel can (renameat2 RENAME_EXCHANGE), so that no moment is without an `out`; the old one is
    then removed from its new name."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # No exchange here: move the old one aside first (a folder named for this process, which a
    # later export removes if this one is killed between the renames), drop it last.
    old = tmp.with_name(tmp.name.removesuffix(".tmp") + ".old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

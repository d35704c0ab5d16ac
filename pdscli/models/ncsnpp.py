"""NCSN++ (Song et al., score_sde), in pure PyTorch, with score_sde's state_dict.

The modules sit in one flat `all_modules` list in the reference's construction order, because
that order *is* the checkpoint format (`all_modules.<i>.<name>`). `forward` does not walk that
list with a running index as the reference does: the constructor also records which module plays
which role (plain Python lists, so nothing is registered twice), and `forward` reads as the U-Net.

Call: `net(x, sigma)`, x [B, C, H, W] float32 in the data scale, sigma [B] float32; returns the
score (the output divided by sigma when scale_by_sigma is on), float32.

- Fourier embedding (every continuous VE config): sigma goes in as is, the net embeds log sigma.
- Positional embedding (the discrete `cifar10_ncsnpp`): the net was trained on integer labels
  into the sigma ladder `sigmas` (label 0 = sigma_max). An integer `sigma` tensor is taken as
  those labels, as score_sde passes them; a float sigma is mapped to the nearest rung in log
  space, label = round((N-1) * log(sigma_max/sigma) / log(sigma_max/sigma_min)), which is what
  score_sde's discrete VE score function computes from t. The output is then divided by the
  rung's sigma, as the reference does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from pdscli.errors import PdsError
from pdscli.models import layers
from pdscli.models.config import check_memory, validate_config
from pdscli.models.layers import SKIP_SCALE, Combine, Downsample, Upsample, group_norm


def sigma_ladder(sigma_min: float, sigma_max: float, num_scales: int) -> np.ndarray:
    """score_sde's `get_sigmas`: num_scales noise levels from sigma_max down to sigma_min, float64."""
    return np.exp(np.linspace(np.log(sigma_max), np.log(sigma_min), num_scales))


@dataclass
class _DownLevel:
    blocks: list = field(default_factory=list)  # (resblock, attention or None)
    downsample: nn.Module | None = None
    pyramid: nn.Module | None = None  # Combine (input_skip) or a resampling conv (residual)


@dataclass
class _UpLevel:
    blocks: list = field(default_factory=list)
    attn: nn.Module | None = None
    head_norm: nn.Module | None = None  # output_skip / residual head at this resolution
    head_conv: nn.Module | None = None
    pyramid_up: nn.Module | None = None  # residual: upsamples the pyramid to this resolution
    upsample: nn.Module | None = None


@dataclass
class _Parts:
    """Which module of `all_modules` plays which role. A plain object, so nothing is registered twice."""

    fourier: nn.Module | None = None
    time_mlp: list = field(default_factory=list)  # two Linears, or none when not conditional
    conv_in: nn.Module | None = None
    down_levels: list = field(default_factory=list)
    mid: list = field(default_factory=list)  # resblock, attention, resblock
    up_levels: list = field(default_factory=list)
    out_norm: nn.Module | None = None  # final head unless progressive == 'output_skip'
    out_conv: nn.Module | None = None


class NCSNpp(nn.Module):
    """NCSN++ built from a score_sde config as a nested dict (`model` and `data` sections)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        m, data = config["model"], config["data"]
        self.act = layers.get_act(m["nonlinearity"])
        self.register_buffer(
            "sigmas", torch.tensor(sigma_ladder(m["sigma_min"], m["sigma_max"], m["num_scales"]), dtype=torch.float64)
        )
        self._log_sigma_max = math.log(m["sigma_max"])
        self._log_sigma_ratio = math.log(m["sigma_max"] / m["sigma_min"])
        self.centered = data["centered"]
        self.scale_by_sigma = m["scale_by_sigma"]
        self.skip_rescale = m["skip_rescale"]
        self.resblock_type = m["resblock_type"].lower()
        self.progressive = m["progressive"].lower()
        self.progressive_input = m["progressive_input"].lower()
        self.body_dtype = torch.float32
        self._check_choices(m["embedding_type"].lower())

        self.parts = _Parts()
        self.all_modules = nn.ModuleList()  # filled by _add, in the reference's order
        self.positional = None
        self._add_noise_embedding(m)
        self._add_pyramid_resamplers(m, data["num_channels"])
        skip_channels = self._add_down_path(m, data)
        in_ch = skip_channels[-1]
        self.parts.mid = [self._add(self._res_block(in_ch)), self._add(self._attn_block(in_ch)),
                          self._add(self._res_block(in_ch))]
        self._add_up_path(m, data, skip_channels)

    # ---- construction ----

    def _check_choices(self, embedding_type: str) -> None:
        choices = {"embedding_type": (embedding_type, ("fourier", "positional")),
                   "resblock_type": (self.resblock_type, ("ddpm", "biggan")),
                   "progressive": (self.progressive, ("none", "output_skip", "residual")),
                   "progressive_input": (self.progressive_input, ("none", "input_skip", "residual"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")

    def _add(self, module: nn.Module) -> nn.Module:
        self.all_modules.append(module)
        return module

    def _res_block(self, in_ch: int, out_ch: int | None = None, *, up: bool = False, down: bool = False):
        m = self.config["model"]
        common = dict(temb_dim=4 * m["nf"] if m["conditional"] else None, dropout=m["dropout"],
                      skip_rescale=self.skip_rescale, init_scale=m["init_scale"])
        if self.resblock_type == "ddpm":  # resolution changes are separate modules there
            return layers.ResBlockDDPM(self.act, in_ch, out_ch, **common)
        return layers.ResBlockBigGAN(self.act, in_ch, out_ch, up=up, down=down, fir=m["fir"],
                                     fir_kernel=m["fir_kernel"], **common)

    def _attn_block(self, channels: int) -> layers.AttnBlock:
        return layers.AttnBlock(channels, skip_rescale=self.skip_rescale, init_scale=self.config["model"]["init_scale"])

    def _add_noise_embedding(self, m: dict) -> None:
        nf = m["nf"]
        if m["embedding_type"].lower() == "fourier":
            self.parts.fourier = self._add(layers.GaussianFourierProjection(embedding_size=nf, scale=m["fourier_scale"]))
            embed_dim = 2 * nf
        else:  # the positional embedding has no weights: not in all_modules
            self.positional = layers.PositionalEmbedding(nf)
            embed_dim = nf
        if m["conditional"]:
            self.parts.time_mlp = [self._add(layers.dense(embed_dim, nf * 4)), self._add(layers.dense(nf * 4, nf * 4))]

    def _add_pyramid_resamplers(self, m: dict, channels: int) -> None:
        # Weightless, so registered beside all_modules as in the reference.
        self.pyramid_upsample = self.pyramid_downsample = None
        if self.progressive == "output_skip":
            self.pyramid_upsample = Upsample(channels, fir=m["fir"], fir_kernel=m["fir_kernel"])
        if self.progressive_input == "input_skip":
            self.pyramid_downsample = Downsample(channels, fir=m["fir"], fir_kernel=m["fir_kernel"])

    def _add_down_path(self, m: dict, data: dict) -> list[int]:
        """Builds the encoder; returns the channel counts of the skip connections it leaves."""
        nf, ch_mult, fir, fir_kernel = m["nf"], m["ch_mult"], m["fir"], m["fir_kernel"]
        self.parts.conv_in = self._add(layers.conv3x3(data["num_channels"], nf))
        skip_channels = [nf]
        in_ch, pyramid_ch = nf, data["num_channels"]
        for i_level, mult in enumerate(ch_mult):
            level = _DownLevel()
            resolution = data["image_size"] // 2**i_level
            for _ in range(m["num_res_blocks"]):
                block = self._add(self._res_block(in_ch, nf * mult))
                in_ch = nf * mult
                attn = self._add(self._attn_block(in_ch)) if resolution in m["attn_resolutions"] else None
                level.blocks.append((block, attn))
                skip_channels.append(in_ch)
            if i_level != len(ch_mult) - 1:
                if self.resblock_type == "ddpm":
                    level.downsample = self._add(Downsample(in_ch, with_conv=m["resamp_with_conv"], fir=fir,
                                                            fir_kernel=fir_kernel))
                else:
                    level.downsample = self._add(self._res_block(in_ch, down=True))
                if self.progressive_input == "input_skip":
                    method = m["progressive_combine"].lower()
                    level.pyramid = self._add(Combine(pyramid_ch, in_ch, method=method))
                    in_ch = 2 * in_ch if method == "cat" else in_ch
                elif self.progressive_input == "residual":
                    level.pyramid = self._add(Downsample(pyramid_ch, in_ch, with_conv=True, fir=fir,
                                                         fir_kernel=fir_kernel))
                    pyramid_ch = in_ch
                skip_channels.append(in_ch)
            self.parts.down_levels.append(level)
        return skip_channels

    def _add_up_path(self, m: dict, data: dict, skip_channels: list[int]) -> None:
        """Builds the decoder (coarsest resolution first), consuming `skip_channels`, and the output head."""
        nf, ch_mult, fir, fir_kernel = m["nf"], m["ch_mult"], m["fir"], m["fir_kernel"]
        channels, init_scale = data["num_channels"], m["init_scale"]
        in_ch, pyramid_ch = skip_channels[-1], 0
        for i_level in reversed(range(len(ch_mult))):
            level = _UpLevel()
            for _ in range(m["num_res_blocks"] + 1):
                level.blocks.append(self._add(self._res_block(in_ch + skip_channels.pop(), nf * ch_mult[i_level])))
                in_ch = nf * ch_mult[i_level]
            if data["image_size"] // 2**i_level in m["attn_resolutions"]:
                level.attn = self._add(self._attn_block(in_ch))
            coarsest = i_level == len(ch_mult) - 1
            if self.progressive == "output_skip":
                level.head_norm = self._add(group_norm(in_ch))
                level.head_conv = self._add(layers.conv3x3(in_ch, channels, init_scale=init_scale))
            elif self.progressive == "residual" and coarsest:
                level.head_norm = self._add(group_norm(in_ch))
                level.head_conv = self._add(layers.conv3x3(in_ch, in_ch))
                pyramid_ch = in_ch
            elif self.progressive == "residual":
                level.pyramid_up = self._add(Upsample(pyramid_ch, in_ch, with_conv=True, fir=fir,
                                                      fir_kernel=fir_kernel))
                pyramid_ch = in_ch
            if i_level != 0:
                if self.resblock_type == "ddpm":
                    level.upsample = self._add(Upsample(in_ch, with_conv=m["resamp_with_conv"], fir=fir,
                                                        fir_kernel=fir_kernel))
                else:
                    level.upsample = self._add(self._res_block(in_ch, up=True))
            self.parts.up_levels.append(level)
        assert not skip_channels, "every skip connection is consumed"
        if self.progressive != "output_skip":
            self.parts.out_norm = self._add(group_norm(in_ch))
            self.parts.out_conv = self._add(layers.conv3x3(in_ch, channels, init_scale=init_scale))

    # ---- precision ----

    def noise_embedding_modules(self) -> list[nn.Module]:
        """The modules that map sigma to the time embedding; they always run in float32."""
        return [m for m in (self.parts.fourier, self.positional, *self.parts.time_mlp) if m is not None]

    def set_precision(self, dtype: torch.dtype) -> "NCSNpp":
        """Run the body in `dtype` (float32, float16 or bfloat16); inputs and outputs stay float32.

        The noise embedding stays float32 (its phases reach the thousands: half precision would
        scramble sin/cos), GroupNorm keeps float32 parameters and statistics, and the float64
        sigma ladder is untouched. The body's weights are cast once, here.
        """
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"precision must be float32, float16 or bfloat16, not {dtype}")
        keep_fp32 = set(self.noise_embedding_modules())
        for module in self.modules():
            # Leaves hold all the weights and FIR kernels; the root holds only the sigma ladder.
            is_leaf = next(module.children(), None) is None
            if is_leaf and module not in keep_fp32 and not isinstance(module, nn.GroupNorm):
                module.to(dtype)
        self.body_dtype = dtype
        return self

    def reset_constants(self, device: torch.device | None = None) -> None:
        """Recompute the non-persistent buffers (FIR kernels, positional frequencies), on `device` if given.

        A model built on the meta device gets its weights from a state_dict; these it gets here.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_constants"):
                module.reset_constants(device)

    # ---- forward ----

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        temb, used_sigmas = self._embed_noise(sigma)
        if not self.centered:
            x = 2 * x - 1.0  # data in [0, 1] -> [-1, 1]
        h = self._unet(self._to_body(x), None if temb is None else self._to_body(temb))
        if h.dtype != torch.float32:
            h = h.float()
        if self.scale_by_sigma:  # in float32: sigma_min = 0.01 makes the output 100x larger
            h = h / used_sigmas.reshape(-1, 1, 1, 1)
        return h

    def _to_body(self, t: torch.Tensor) -> torch.Tensor:
        # Cast only when needed, so a float32 export carries no no-op Cast nodes.
        return t if t.dtype == self.body_dtype else t.to(self.body_dtype)

    def _embed_noise(self, sigma: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(time embedding or None, the sigma the output is divided by), both float32."""
        if self.parts.fourier is not None:
            used_sigmas = sigma if sigma.dtype == torch.float32 else sigma.float()
            temb = self.parts.fourier(torch.log(used_sigmas))
        else:
            labels = sigma if not sigma.is_floating_point() else self._labels_from_sigma(sigma)
            used_sigmas = self.sigmas[labels.long()].float()
            temb = self.positional(labels)
        if not self.parts.time_mlp:
            return None, used_sigmas
        first, second = self.parts.time_mlp
        return second(self.act(first(temb))), used_sigmas

    def _labels_from_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        # float32, not float64: TensorRT has no doubles, and rungs are far apart next to its rounding.
        position = (self._log_sigma_max - torch.log(sigma.float())) / self._log_sigma_ratio
        labels = torch.round(position * (self.sigmas.shape[0] - 1)).long()
        return labels.clamp(0, self.sigmas.shape[0] - 1)

    def _resample(self, module: nn.Module, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        # BigGAN blocks resample and take the embedding; the DDPM path uses plain (up|down)samplers.
        return module(h, temb) if self.resblock_type == "biggan" else module(h)

    def _skip_sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a + b) / SKIP_SCALE if self.skip_rescale else a + b

    def _unet(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        parts = self.parts
        input_pyramid = x
        hs = [parts.conv_in(x)]
        for level in parts.down_levels:
            for block, attn in level.blocks:
                h = block(hs[-1], temb)
                hs.append(attn(h) if attn is not None else h)
            if level.downsample is None:
                continue
            h = self._resample(level.downsample, hs[-1], temb)
            if self.progressive_input == "input_skip":
                input_pyramid = self.pyramid_downsample(input_pyramid)
                h = level.pyramid(input_pyramid, h)
            elif self.progressive_input == "residual":
                input_pyramid = h = self._skip_sum(level.pyramid(input_pyramid), h)
            hs.append(h)

        block_a, attn, block_b = parts.mid
        h = block_b(attn(block_a(hs[-1], temb)), temb)

        pyramid = None
        for level in parts.up_levels:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            if level.attn is not None:
                h = level.attn(h)
            if level.head_conv is not None:
                head = level.head_conv(self.act(level.head_norm(h)))
                if self.progressive == "output_skip" and pyramid is not None:
                    pyramid = self.pyramid_upsample(pyramid) + head
                else:
                    pyramid = head
            elif level.pyramid_up is not None:
                pyramid = h = self._skip_sum(level.pyramid_up(pyramid), h)
            if level.upsample is not None:
                h = self._resample(level.upsample, h, temb)

        if self.progressive == "output_skip":
            return pyramid
        return parts.out_conv(self.act(parts.out_norm(h)))


def build_model(config: dict, *, device: str | torch.device | None = None) -> NCSNpp:
    """A randomly initialised NCSN++ (the reference's init) for a validated config.

    `device="meta"` builds the structure only: no memory, no init cost (shapes, parameter counts).
    """
    validate_config(config)
    target = torch.device(device if device is not None else "cpu")
    if target.type != "meta":
        check_memory(config, target)
    try:
        with torch.device(target):
            return NCSNpp(config)
    except ValueError as e:  # e.g. channel counts GroupNorm cannot split into groups
        raise PdsError(f"config does not describe a valid NCSN++: {e}") from None

"""Feature networks for FID/KID: torch-fidelity's Inception (the real one) or a small stand-in.

A feature network takes uint8 images [B, 3, H, W] on its device and returns float [B, D]; its
`name` goes into statistics files, so that features of different networks are never compared.

- Inception (default): torch-fidelity's `inception-v3-compat`, the TensorFlow FID Inception
  (2015-12-05 graph) ported to PyTorch, with its TF-1.x-compatible bilinear resize to 299x299,
  its 2048-d pool3 features. torch-fidelity is imported only here and only when this network
  is used (it imports torchvision, which may not load next to a CPU torch). Its weights come
  through torch-fidelity, which downloads them once into torch's hub cache; `--features FILE`
  loads a local copy of that file instead (for machines without internet).
- Stand-in (`pds-tiny-features`): a three-layer conv net with fixed random weights, for tests
  and for trying the pipeline without the Inception weights. Its numbers are not FIDs anyone
  else reports. The file is a torch .pt holding a dict:
  `{"format": "pds-tiny-features/1", "dim": D, "resize": R, "state_dict": {...}}`, where
  `resize` is the side every image is bilinearly resized to, and the state dict is
  `TinyFeatureNet`'s. `save_tiny_features(path)` writes one.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from pdscli.errors import PdsError, first_line
from pdscli.fsutil import atomic_path, sha256_file

TINY_FORMAT = "pds-tiny-features/1"
INCEPTION_NAME = "inception-v3-compat/2048"  # torch-fidelity's TF-compatible Inception, pool3
# The weights file torch-fidelity downloads; its name ends with the first 8 hex digits of its sha256.
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
INCEPTION_SHA256_PREFIX = "6726825d"
INSTALL_HINT = ('FID with the Inception network needs torch-fidelity: pip install "pds[eval]" '
                "(or pip install torch-fidelity); --features FILE takes a stand-in network instead")


class FeatureNet(Protocol):
    name: str
    dim: int
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------
# The stand-in.


class TinyFeatureNet(nn.Module):
    """uint8 [B, 3, H, W] -> bilinear resize to `resize`² -> three stride-2 3x3 convs -> spatial mean [B, dim]."""

    def __init__(self, dim: int = 32, resize: int = 32):
        super().__init__()
        self.resize = resize
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, dim, 3, stride=2, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.conv3(x).mean(dim=(2, 3))


def save_tiny_features(path, *, dim: int = 32, resize: int = 32, seed: int = 0) -> Path:
    """Write a stand-in feature network with random weights drawn from `seed` (atomically)."""
    torch.manual_seed(seed)
    net = TinyFeatureNet(dim, resize)
    with atomic_path(path) as tmp:
        torch.save({"format": TINY_FORMAT, "dim": dim, "resize": resize, "state_dict": net.state_dict()}, tmp)
    return Path(path)


class _Wrapped:
    """A module in eval mode on a device, called without gradients."""

    def __init__(self, module, name: str, dim: int, device: torch.device, pick=None):
        self.module, self.name, self.dim, self.device, self.pick = module.to(device).eval(), name, dim, device, pick

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = self.module(images.to(self.device))
        return (self.pick(out) if self.pick else out).float()


def _load_tiny(path: Path, blob: dict, device: torch.device) -> _Wrapped:
    try:
        net = TinyFeatureNet(int(blob["dim"]), int(blob["resize"]))
        net.load_state_dict(blob["state_dict"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise PdsError(f"{path} says {TINY_FORMAT} but does not hold its network: {str(e).splitlines()[0]}") from None
    # The file's hash names the features: two stand-ins with different weights never share statistics.
    return _Wrapped(net, f"pds-tiny-features/{sha256_file(path)[:12]}", int(blob["dim"]), device)


# ----------------------------------------------------------------------------------------
# torch-fidelity's Inception.


def _import_torch_fidelity():
    try:
        import torch_fidelity
    except ImportError as e:
        if getattr(e, "name", None) == "torch_fidelity":
            raise PdsError(INSTALL_HINT) from None
        raise PdsError(f"torch-fidelity is installed but cannot be imported ({str(e).splitlines()[0]}); "
                       f"it needs a torchvision built for this torch ({torch.__version__})") from None
    except Exception as e:  # torchvision built for another torch fails with RuntimeError at import
        raise PdsError(f"torch-fidelity cannot be imported: {type(e).__name__}: {str(e).splitlines()[0]} "
                       f"(it needs a torchvision built for torch {torch.__version__})") from None
    return torch_fidelity


def inception_cache_path() -> Path:
    """Where torch-fidelity's download lands: torch's hub cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def _how_to_get_weights() -> str:
    return (f"download {INCEPTION_URL} on a machine with internet and pass --features PATH_TO/{INCEPTION_FILE} "
            f"(or copy it to {inception_cache_path()})")


def _load_inception(weights: Path | None, device: torch.device) -> _Wrapped:
    """`weights`: a local copy, already read once with weights_only=True (torch-fidelity unpickles it in full)."""
    tf = _import_torch_fidelity()
    try:
        net = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=
                                             None if weights is None else str(weights))
    except OSError as e:  # urllib's URLError is an OSError: no internet and nothing in the cache
        raise PdsError(f"cannot get the Inception weights ({type(e).__name__}: {str(e).splitlines()[0]}): "
                       + _how_to_get_weights()) from None
    except RuntimeError as e:  # load_state_dict: a file with other keys or shapes
        raise PdsError(f"{weights} does not hold torch-fidelity's Inception weights: {str(e).splitlines()[0]}") from None
    name = INCEPTION_NAME
    if weights is not None:
        digest = sha256_file(weights)
        if not digest.startswith(INCEPTION_SHA256_PREFIX):
            name = f"{INCEPTION_NAME}/weights-{digest[:12]}"  # not the published file: say so in the name
    return _Wrapped(net, name, 2048, device, pick=lambda out: out[0])


# ----------------------------------------------------------------------------------------
# Choosing.


def open_features(path: Path | None, device: torch.device) -> FeatureNet:
    """`--features`: None -> Inception via torch-fidelity (downloaded on first use); a file -> what it holds."""
    if path is None:
        return _load_inception(None, device)
    path = Path(path)
    if not path.is_file():
        raise PdsError(f"no such feature network file: {path}; for the Inception weights " + _how_to_get_weights())
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False, which pds fid never does: name the object instead.
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        held = f" ({found.group(1)})" if found else ""
        raise PdsError(f"{path} holds a Python object{held}, not only tensors; pds fid loads feature networks as "
                       "plain weights (torch.load(weights_only=True)) and never unpickles code") from None
    except Exception as e:
        raise PdsError(f"cannot read {path} as a torch file of weights: {first_line(e)}") from None
    if isinstance(blob, dict) and blob.get("format") == TINY_FORMAT:
        return _load_tiny(path, blob, device)
    if isinstance(blob, dict) and any(str(k).startswith("Conv2d_1a_3x3.") for k in blob):
        return _load_inception(path, device)
    raise PdsError(f"{path} is neither torch-fidelity's Inception weights ({INCEPTION_FILE}) "
                   f"nor a pds stand-in feature network ({TINY_FORMAT})")

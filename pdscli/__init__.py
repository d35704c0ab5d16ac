"""pds: fast sampling for score-based diffusion models.

The one contract everywhere is ``score(x, sigma) -> score``: x is [B, C, H, W] float32 in the
data scale ([0, 1] plus noise), sigma is [B] float32, and the result is grad log p_sigma(x).
PyTorch modules, ONNX Runtime and TensorRT engines and the analytic model all implement it.

The Python API (docs/api.md): ``pdscli.load``, ``pdscli.sample``, ``pdscli.filters``,
``pdscli.fid``; diffusers pipelines: ``pdscli.diffusers``. Every name is imported on first use,
so that ``import pdscli`` (and ``pds --help``) stays cheap and never imports diffusers.
"""

import importlib
import sys
import types

__version__ = "0.3.0"

__all__ = ["Filters", "Model", "PdsError", "__version__", "fid", "filters", "load", "load_score_model", "sample"]

_API = ("Model", "fid", "filters", "load")


class _SamplePackage(types.ModuleType):
    """`pdscli.sample` is two things: the package of the sampling run (pdscli.sample.setup, ...)
    and, called, the API's `sample(model, n, ...)`. A plain function of that name would be
    replaced by the package as soon as anything imports it, so the package itself is callable."""

    def __call__(self, *args, **kwargs):
        from pdscli.api import sample

        return sample(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature / help in notebooks: the function's, not (*args, **kwargs)
        import inspect

        from pdscli.api import sample

        return inspect.signature(sample)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # The import system binds a loaded subpackage here: make `pdscli.sample` callable then.
        if name == "sample" and isinstance(value, types.ModuleType) and not isinstance(value, _SamplePackage):
            value.__class__ = _SamplePackage
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _API:
        from pdscli import api

        return getattr(api, name)
    if name == "Filters":
        from pdscli.precondition import Filters

        return Filters
    if name == "PdsError":
        from pdscli.errors import PdsError

        return PdsError
    if name == "load_score_model":
        from pdscli.models.checkpoint import load_score_model

        return load_score_model
    if name in ("sample", "diffusers"):  # subpackages: `sample` is made callable on import (_Package)
        return importlib.import_module(f"pdscli.{name}")
    raise AttributeError(f"module 'pdscli' has no attribute {name!r}")

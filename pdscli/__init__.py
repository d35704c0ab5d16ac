"""pds: fast sampling for score-based diffusion models.

The one contract everywhere is ``score(x, sigma) -> score``: x is [B, C, H, W] float32 in the
data scale ([0, 1] plus noise), sigma is [B] float32, and the result is grad log p_sigma(x).
PyTorch modules, ONNX Runtime and TensorRT engines and the analytic model all implement it.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_score_model"]


def __getattr__(name):
    # Lazy so that `import pdscli` (and `pds --help`) stays cheap.
    if name == "load_score_model":
        from pdscli.models.checkpoint import load_score_model

        return load_score_model
    raise AttributeError(name)

"""Per-sample noise from a counter-based generator: element e of draw d of sample i is a pure
function of (seed, i, d, e).

So the images a run makes depend on the seed and the sample indices only, never on the batch
size, the number of ranks, the thread count or which batch a sample landed in; and a draw for
a whole batch is one vectorised computation (no generator per sample, nothing a CUDA graph
cannot capture).

The generator is Philox4x32-10 (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy
as 1, 2, 3", SC 2011), written in torch integer ops: each 32-bit word lives in an int64 lane and
the 32x32 -> 64-bit products are split in 16-bit halves, so no intermediate leaves int64's
exact range and CPU and GPU compute the same integers. Its 128-bit counter is

    (element group k, draw d, sample index low 32 bits, sample index high 32 bits)

and its 64-bit key the seed. One counter gives four 32-bit words, i.e. two Box–Muller pairs,
so element e of a sample is normal 4k + j with k = e // 4, j = e % 4. Box–Muller runs in float64
and is rounded once to float32: transcendental functions may differ in their last float64 bit
between CPU kernels (vector body against scalar tail) or between CPU and GPU, a difference
about 2^29 times smaller than float32's rounding step: it changes the float32 only where it
straddles a rounding boundary, about once in 2^29 numbers (tests/test_noise.py checks bit
identity across batch sizes and thread counts; scripts/gpu_bench.py measures CPU against GPU).

On a GPU the whole draw is one fused kernel (`torch.compile` of `normals`, when Triton is
there): eager torch launches some two hundred elementwise kernels per draw, each a pass over
the batch's int64 lanes. The fused kernel computes the same integers and the same float64
functions (to the last bit or so), rounded to float32.

NOISE_VERSION names this definition; a run records it, and `--resume` refuses to continue a
run made with another (version 1 was one torch.Generator per sample, seeded by `sample_seed`).
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import numpy as np
import torch

NOISE_VERSION = 2

MASK32 = 0xFFFFFFFF
SEED_MAX = 2**64 - 1  # the seed is the 64-bit Philox key: a larger one would repeat a smaller seed's noise
# Philox4x32's round multipliers and Weyl key increments (the paper's constants).
PHILOX_M = (0xD2511F53, 0xCD9E8D57)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUNDS = 10
TWO_PI = 2.0 * math.pi


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit torch.Generator seed for stream `index` of seed `seed` (training uses it per step)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit a (int64 lanes) and a 32-bit constant m.

    a * m can reach 2^64, past int64; a * (m's 16-bit halves) stays below 2^48, exact.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    s = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (s >> 32) + (p_hi >> 16), s & MASK32


def key_schedule(key: tuple[int, int], rounds: int = PHILOX_ROUNDS) -> list[tuple[int, int]]:
    """The round keys of a Philox4x32 key: the key, then Weyl increments mod 2^32."""
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    keys = []
    for _ in range(rounds):
        keys.append((k0, k1))
        k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
    return keys


def philox4x32(c0, c1, c2, c3, key, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on broadcastable int64 tensors of 32-bit words; returns the four output words.

    key: two Python ints (the schedule is then computed here, once, not per element), or a
    [rounds, 2] int64 tensor of round keys (`key_schedule`), the form a compiled kernel takes as
    an input rather than specialising on the seed.
    """
    keys = key_schedule(key, rounds) if isinstance(key, tuple) else key
    for r in range(rounds):
        k0, k1 = keys[r][0], keys[r][1]
        hi0, lo0 = _mulhilo(c0, PHILOX_M[0])
        hi1, lo1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _box_muller(u_word: torch.Tensor, v_word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent N(0, 1) from two 32-bit words, in float64.

    (w + 0.5) / 2^32 lies in (0, 1) exactly, so log never sees 0; the largest |z| is about 6.7.
    """
    scale = 2.0**-32
    u = (u_word.double() + 0.5) * scale
    theta = (v_word.double() + 0.5) * (scale * TWO_PI)
    r = torch.sqrt(-2.0 * torch.log(u))
    return r * torch.cos(theta), r * torch.sin(theta)


def normals(key, rows: torch.Tensor, draw: torch.Tensor, groups: torch.Tensor, numel: int) -> torch.Tensor:
    """Draw `draw` for every row: [B, numel] float32.

    key: the seed's Philox key, as `philox4x32` takes it; rows [B, 2] int64: each sample index's (low, high) 32-bit words; draw: int64 scalar tensor;
    groups [1, K] int64: 0..K-1 with 4K >= numel. One philox4x32 call for the whole batch.
    """
    lo, hi = rows[:, :1], rows[:, 1:]
    words = philox4x32(groups, draw, lo, hi, key)
    b, k = rows.shape[0], groups.shape[1]
    w0, w1, w2, w3 = (w.expand(b, k) for w in words)
    z0, z1 = _box_muller(w0, w1)
    z2, z3 = _box_muller(w2, w3)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(b, 4 * k)
    return z[:, :numel].float()


_FUSED = {}  # "fn": the compiled `normals`, or None once compiling it failed


def fused_available(device: torch.device) -> bool:
    """Whether draws on `device` run as one compiled kernel: a CUDA device with Triton installed."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None and _FUSED.get("fn", True) is not None


def _draw_fused(key, rows, draw, groups, numel) -> torch.Tensor:
    if "fn" not in _FUSED:
        # Shapes may vary (a run's last batch, other image sizes): one dynamic recompile, not one per shape.
        _FUSED["fn"] = torch.compile(normals, fullgraph=True)
    try:
        return _FUSED["fn"](key, rows, draw, groups, numel)
    except Exception as e:  # a compiler problem must not stop a run: the eager ops give the same numbers
        _FUSED["fn"] = None
        warnings.warn(f"pds: the fused noise kernel did not compile ({type(e).__name__}); drawing noise with eager torch ops",
                      RuntimeWarning, stacklevel=3)
        return normals(key, rows, draw, groups, numel)


def index_words(indices, device) -> torch.Tensor:
    """[B, 2] int64: (low, high) 32-bit words of each sample index."""
    ints = [int(i) for i in indices]
    return torch.tensor([[i & MASK32, (i >> 32) & MASK32] for i in ints], dtype=torch.int64, device=device)


class SampleNoise:
    """Callable: `noise()` returns a fresh N(0, I) batch [B, *shape] float32, row b from sample indices[b].

    Draw d of row b is `normals` of (seed, indices[b], d): the same numbers whatever else is in
    the batch. The draw counter and the index words are device tensors updated in place, so a
    CUDA graph that captured draws replays them for new indices after `rebind`.
    """

    def __init__(self, seed: int, indices, shape, device="cpu", *, fused: bool | None = None):
        self.seed = int(seed)
        self.key = (self.seed & MASK32, (self.seed >> 32) & MASK32)
        self.indices = [int(i) for i in indices]
        self.shape = tuple(int(s) for s in shape)
        self.device = torch.device(device)
        self.numel = math.prod(self.shape)
        self.rows = index_words(self.indices, self.device)
        self.groups = torch.arange((self.numel + 3) // 4, dtype=torch.int64, device=self.device)[None, :]
        self.draw = torch.zeros((), dtype=torch.int64, device=self.device)
        self.draws = 0  # draws made since construction or `rebind` (Python-side count)
        # None: fused where available (a GPU with Triton); the eager ops everywhere else.
        self.fused = fused_available(self.device) if fused is None else bool(fused)
        # The compiled kernel takes the round keys as a tensor, so a new seed is no recompile.
        self.key_table = torch.tensor(key_schedule(self.key), dtype=torch.int64, device=self.device) if self.fused else None

    def __call__(self) -> torch.Tensor:
        if self.fused and _FUSED.get("fn", True) is not None:
            z = _draw_fused(self.key_table, self.rows, self.draw, self.groups, self.numel)
        else:
            z = normals(self.key, self.rows, self.draw, self.groups, self.numel)
        self.draw.add_(1)
        self.draws += 1
        return z.view(len(self.indices), *self.shape)

    def rebind(self, indices) -> None:
        """Start over for other samples (as many as before): the next draw is draw 0 of `indices`."""
        indices = [int(i) for i in indices]
        if len(indices) != len(self.indices):
            raise ValueError(f"rebind needs {len(self.indices)} indices, got {len(indices)}")
        self.indices = indices
        self.rows.copy_(index_words(indices, "cpu"))
        self.draw.zero_()
        self.draws = 0

    def __len__(self) -> int:
        return len(self.indices)

"""Per-sample noise: sample i draws from its own generator seeded from (seed, i).

So the images a run makes depend on the seed and the sample indices only, never on the
batch size, the number of ranks or which batch a sample landed in.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for sample `index` of a run seeded `seed`."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32, int(index)]).generate_state(2)
    return int((int(state[0]) << 32 | int(state[1])) & 0x7FFF_FFFF_FFFF_FFFF)


class SampleNoise:
    """Callable: `noise()` returns a fresh N(0, I) batch [B, *shape] float32, row b from sample indices[b]."""

    def __init__(self, seed: int, indices, shape, device="cpu"):
        self.indices = [int(i) for i in indices]
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.generators = []
        for i in self.indices:
            g = torch.Generator(device=self.device)
            g.manual_seed(sample_seed(seed, i))
            self.generators.append(g)

    def __call__(self) -> torch.Tensor:
        return torch.stack(
            [torch.randn(self.shape, generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        )

    def __len__(self) -> int:
        return len(self.indices)

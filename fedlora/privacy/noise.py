"""Where DP-SGD's randomness comes from: the Gaussian noise and the Poisson sampling of each step.

Both must be unknowable to the server. A seeded generator is not: whoever knows the seed (the coordinator writes
it in the config) can regenerate the noise and subtract it from an upload, and knowing which records were sampled
voids the amplification by subsampling the accountant counts on. So by default (``privacy.noise=csprng``) every
random draw of DP-SGD comes from the operating system's CSPRNG (``os.urandom``), as Opacus' ``secure_mode``
intends (its torchcsprng dependency is not installable here):

* uniforms: 53 random bits per draw, so every double in [0, 1) on the 2^-53 grid is equally likely;
* Gaussians: Box–Muller on those uniforms, and — Opacus' defence against floating-point attacks on the noise
  (Mironov 2012; Holohan & Braghin 2021, §5.1, n = 2) — the sum of four standard normals divided by two.

``privacy.noise=seeded-insecure`` draws from torch generators seeded by the run's seed instead: bit-reproducible
runs for tests and benchmarks, and NO privacy against anyone who knows the seed. It is recorded in summary.json,
the privacy report and MLflow, and refused in deployment.
"""

from __future__ import annotations

import math
import os
from typing import Protocol

import torch

CSPRNG = "csprng"
SEEDED = "seeded-insecure"
NOISE_SOURCES = (CSPRNG, SEEDED)


class NoiseSource(Protocol):
    name: str

    def uniform(self, n: int) -> torch.Tensor: ...

    def normal(self, shape: torch.Size, std: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


class SecureNoise:
    """DP randomness from ``os.urandom``; nothing about it can be derived from the run's config."""

    name = CSPRNG

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` doubles uniform on [0, 1) (53 random bits each)."""
        if n == 0:
            return torch.zeros(0, dtype=torch.float64)
        raw = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64)
        return ((raw >> 11) & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53

    def _standard_normal(self, n: int) -> torch.Tensor:
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        u1 = 1.0 - u[:half]  # (0, 1]: log is finite
        r = torch.sqrt(-2.0 * torch.log(u1))
        theta = 2.0 * math.pi * u[half:]
        return torch.cat([r * torch.cos(theta), r * torch.sin(theta)])[:n]

    def normal(self, shape: torch.Size, std: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        n = math.prod(shape)
        z = self._standard_normal(4 * n).reshape(4, n).sum(0) / 2.0  # still N(0, 1): four draws, variance 4 / 4
        return (z * std).to(dtype=dtype).reshape(shape).to(device)


class SeededNoise:
    """DP randomness from torch generators seeded by ``seed`` (two independent streams: sampling, noise).
    Bit-reproducible, and therefore known to anyone who knows the seed: tests and benchmarks only."""

    name = SEEDED

    def __init__(self, seed: int) -> None:
        self._sampling = torch.Generator().manual_seed(_derive(seed, 1))
        self._noise = torch.Generator().manual_seed(_derive(seed, 2))

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(n, generator=self._sampling, dtype=torch.float64)

    def normal(self, shape: torch.Size, std: float, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.normal(0.0, std, size=tuple(shape), generator=self._noise, dtype=dtype).to(device)


def _derive(seed: int, stream: int) -> int:
    """Independent 63-bit seeds for the sampling and noise streams of one run."""
    return (int(seed) * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9) % (2**63 - 1)


def noise_source(name: str, seed: int) -> NoiseSource:
    """The configured source; ``seed`` is only used by the insecure seeded one."""
    if name == CSPRNG:
        return SecureNoise()
    if name == SEEDED:
        return SeededNoise(seed)
    raise ValueError(f"privacy.noise={name!r}: allowed values are {list(NOISE_SOURCES)}")

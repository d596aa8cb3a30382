"""User models for tests, named in configs as "toy_models:NAME" (tests/ is on sys.path)."""

from mixgrpo.models.analytic import GaussianFlow


class BatchDependent(GaussianFlow):
    """The Gaussian flow plus an offset that grows with the batch size: a stand-in for kernels whose rounding
    depends on the batch they compute in (bf16 GEMMs on some GPUs)."""

    def forward(self, x, sigma, cond):
        return super().forward(x, sigma, cond) + 1e-2 * x.shape[0]


def batch_dependent(size: int = 4) -> BatchDependent:
    return BatchDependent(size)

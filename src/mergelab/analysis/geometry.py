"""Task-vector geometry: the data-free quantities `mergelab inspect` reports.

Everything here works on one tensor name at a time, stacked over models:

    weights  (N, *shape)  theta_i
    deltas   (N, *shape)  tau_i = theta_i - theta_ref, where theta_ref is the base
                          model, or the mean of the N models when there is none

and returns sums that `GeometrySums` accumulates over the tensors of a layer (or
of the whole model), so a model is never held in memory at once.

Quantities (all pairwise ones are (N, N)):
    cosine           <tau_i, tau_j> / (|tau_i| |tau_j|), from the accumulated Gram matrix.
    sign conflict    among coordinates where at least two task vectors are nonzero,
                     the share where their nonzero signs do not all agree; also after
                     TIES-style trimming (Yadav et al., 2023, arXiv:2306.01708) that
                     keeps each task vector's top-`density` magnitudes per tensor.
                     "chance" is the rate independent fair-coin signs would give,
                     sum over contested coordinates of 1 - 2^(1 - m), m = nonzero count.
    spectral overlap ||U_i^T U_j||_F^2 / min(k_i, k_j) for the top-k left singular
                     vectors of 2-D task matrices, k = min(8, rank); 1 when one
                     subspace holds the other, max(k_i, k_j) / rows for random ones.
                     The subspace view of task interference is that of TSV-Merge
                     (Gargiulo et al., 2025, arXiv:2412.00081).
    mass kept        share of a task vector's L1 mass in its top-d magnitudes, the
                     part a TIES/DARE-style trim at density d keeps (DARE: Yu et al.,
                     2024, arXiv:2311.03099).

Cost bounds, so that inspecting a 7B model stays a CPU job: trims and masses of
tensors above EXACT_TOPK_MAX_NUMEL entries use a magnitude threshold estimated from
a seeded sample; subspaces of matrices wider than SPECTRAL_MAX_DIM are compared on
an evenly spaced sub-grid, and found by a seeded randomized SVD above EXACT_SVD_MAX_DIM.
The functions here are the readable reference; inspect runs the same statistics from
the stored tensors in compiled code (methods/kernels/geometry.py), tested against float64 numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mergelab.methods.sparsify import keep_count

SPECTRAL_RANK = 8  # k of the top-k singular subspaces compared
SPECTRAL_MAX_DIM = 512  # larger matrices are compared on an evenly spaced sub-grid of rows/columns
EXACT_SVD_MAX_DIM = 256  # above this (smaller side), a seeded randomized SVD replaces the full one
MASS_DENSITIES = (0.1, 0.2, 0.5)
EXACT_TOPK_MAX_NUMEL = 1 << 16  # top-k trims and masses are exact up to this many entries per tensor
# Above it, magnitude quantiles come from a seeded sample of this many entries: the kept share
# is then `density` within sqrt(d (1 - d) / SAMPLE_SIZE), 0.16% at d = 0.2; exact selection on
# every tensor cost most of inspect's time for numbers nobody reads to four digits.
SAMPLE_SIZE = 1 << 16


def gram(x: Tensor) -> Tensor:
    """(N, N) float64 matrix of inner products <x_i, x_j> of the flattened rows of x (N, *shape)."""
    flat = x.reshape(x.shape[0], -1).double()  # float64 products: the compiled pass sums in float64 too
    return flat @ flat.T


def cosine_from_gram(g: Tensor) -> Tensor:
    """(N, N) cosine similarities from a Gram matrix; NaN where a vector has zero norm."""
    norms = g.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.full_like(g, math.nan)).clamp(-1, 1)


def sign_conflicts(deltas: Tensor) -> tuple[int, int, float]:
    """Sign disagreement among task vectors, coordinate by coordinate.

    Args:
        deltas: (N, *shape) task vectors.

    Returns:
        (conflicts, contested, chance): contested counts coordinates where at least
        two rows are nonzero, conflicts those among them holding both a positive and
        a negative entry, chance the conflicts expected if each nonzero sign were a
        fair coin flip (a coordinate with m nonzero entries conflicts w.p. 1 - 2^(1-m)).
    """
    n = deltas.shape[0]
    nonzero = (deltas != 0).sum(dim=0, dtype=torch.uint8 if n < 256 else torch.int64)  # (*shape)
    contested = nonzero >= 2
    # Both signs present <=> the largest entry is positive and the smallest negative.
    conflicts = int((contested & (deltas.amax(dim=0) > 0) & (deltas.amin(dim=0) < 0)).sum())
    chance = sum(int((nonzero == m).sum()) * (1 - 2.0 ** (1 - m)) for m in range(2, n + 1))
    return conflicts, int(contested.sum()), chance


@dataclasses.dataclass
class MagnitudeProfile:
    """Where a trim cuts each of N task vectors, and how much of their L1 mass it keeps.

    threshold: (N,) float32, the magnitude down to which a trim at `density` keeps.
    mass_share: (N, len(MASS_DENSITIES)) float64, the share of each task vector's L1
        mass held by its top-d magnitudes, for each d in MASS_DENSITIES.
    """

    threshold: Tensor
    mass_share: Tensor


def sample_index(numel: int) -> np.ndarray:
    """The SAMPLE_SIZE flat positions (seeded, uniform with replacement, sorted) where tensors of
    `numel` entries are sampled; the same for every model and every call, so a tensor's
    statistics do not depend on what was read before it. Read-only (cached)."""
    return _sample_index(numel, SAMPLE_SIZE)


@functools.lru_cache(maxsize=64)
def _sample_index(numel: int, size: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(0)
    index = np.sort(torch.randint(0, numel, (size,), generator=gen).numpy())  # sorted: reads go forward
    index.flags.writeable = False
    return index


@functools.lru_cache(maxsize=4096)
def _keep(share: float, m: int) -> int:
    # keep_count works on the decimal the user wrote (a Fraction per call): worth caching per tensor size
    return keep_count(share, m)


def profile_from_magnitudes(mags: np.ndarray, density: float) -> MagnitudeProfile:
    """The MagnitudeProfile of (N, m) float32 magnitudes |tau_i| (all entries, or a sample).

    A partition around the few ranks needed (O(m)) instead of a full sort: entries after
    position m - k are the k largest, whatever their order.
    """
    n, m = mags.shape
    if m == 0:
        return MagnitudeProfile(torch.zeros(n), torch.zeros(n, len(MASS_DENSITIES), dtype=torch.float64))
    ranks = sorted({m - _keep(d, m) for d in (density, *MASS_DENSITIES)})
    part = np.partition(mags, ranks, axis=1)
    total = part.sum(axis=1, dtype=np.float64).clip(min=1e-300)
    shares = np.stack([part[:, m - _keep(d, m):].sum(axis=1, dtype=np.float64) for d in MASS_DENSITIES], 1)
    return MagnitudeProfile(threshold=torch.from_numpy(part[:, m - _keep(density, m)].copy()),
                            mass_share=torch.from_numpy(shares / total[:, None]))


def magnitude_profile(weights: Sequence[Tensor], reference: Tensor | None, density: float) -> MagnitudeProfile:
    """The trim thresholds and kept-mass shares of task vectors tau_i = w_i - reference.

    threshold_i is the keep_count(density, m)-th largest |tau_i| among m entries, and
    mass_share_i(d) the sum of the keep_count(d, m) largest |tau_i| over the sum of all m:
    over every entry when the tensor has at most EXACT_TOPK_MAX_NUMEL, otherwise over the
    seeded uniform sample `sample_index` (the same positions for every model), which puts
    the share a trim keeps within sqrt(d (1 - d) / SAMPLE_SIZE) of d (0.16% at d = 0.2).
    Only the sampled entries are converted to float32 and subtracted here.

    Args:
        weights: N tensors of one shape, any floating dtype, as stored.
        reference: the base tensor, or None for the models' mean.
        density: share kept by the trim, in (0, 1].
    """
    numel = weights[0].numel()
    if numel > EXACT_TOPK_MAX_NUMEL:
        index = torch.from_numpy(sample_index(numel).copy())
        pick = lambda t: t.reshape(-1)[index].float()  # noqa: E731
    else:
        pick = lambda t: t.reshape(-1).float()  # noqa: E731
    w = torch.stack([pick(t) for t in weights])  # (N, m)
    ref = pick(reference) if reference is not None else w.mean(dim=0)
    return profile_from_magnitudes((w - ref).abs_().numpy(), density)


def trim_top_magnitude(deltas: Tensor, density: float, threshold: Tensor | None = None) -> Tensor:
    """Copy of deltas (N, *shape) keeping each row's top-`density` magnitudes (TIES trim), zeros elsewhere.

    Keeps |tau_i| >= threshold_i (magnitude_profile: exact up to EXACT_TOPK_MAX_NUMEL
    entries, a sampled quantile above; entries tied with the threshold are all kept).
    Selecting exactly in a 10^8-entry tensor costs seconds per model, the estimate a
    fraction of that, and the statistics built on the trim (sign-conflict rates) do not
    need more precision.
    """
    if threshold is None:
        threshold = magnitude_profile(list(deltas), torch.zeros_like(deltas[0]), density).threshold
    return torch.where(deltas.abs() >= threshold.reshape(-1, *[1] * (deltas.dim() - 1)), deltas, 0.0)


def kept_mass(deltas: Tensor, density: float) -> Tensor:
    """(N,) float64 L1 mass of each row's top-`density` magnitudes (the part a TIES trim keeps).

    Exact up to EXACT_TOPK_MAX_NUMEL entries; above, the share a seeded sample's top
    `density` holds of the sample's mass, times the row's exact L1 mass.
    """
    numel = deltas[0].numel()
    if numel > EXACT_TOPK_MAX_NUMEL:
        index = torch.from_numpy(sample_index(numel).copy())
        mags = deltas.reshape(deltas.shape[0], -1)[:, index].abs()
    else:
        mags = deltas.reshape(deltas.shape[0], -1).abs()
    top = mags.double().sort(dim=1, descending=True).values[:, :keep_count(density, mags.shape[1])].sum(dim=1)
    share = top / mags.double().sum(dim=1).clamp(min=1e-300)
    return share * deltas.reshape(deltas.shape[0], -1).abs().sum(dim=1, dtype=torch.float64)


def even_indices(n: int, limit: int) -> Tensor:
    # The same evenly spaced sub-grid for every model, so subspaces stay comparable.
    return torch.linspace(0, n - 1, limit).round().long() if n > limit else torch.arange(n)


def top_left_singular(m: Tensor, k_max: int = SPECTRAL_RANK, *, seed: int = 0) -> Tensor:
    """(rows, k) orthonormal top-k left singular vectors of m, k = min(k_max, numerical rank).

    Uses a full SVD when the smaller side is at most EXACT_SVD_MAX_DIM, otherwise a
    randomized range finder with two power iterations (Halko et al., 2011,
    arXiv:0909.4061) seeded by `seed`, so results do not depend on global RNG state.
    """
    rows, cols = m.shape
    if min(rows, cols) <= EXACT_SVD_MAX_DIM:
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
    else:
        q = min(k_max + 8, rows, cols)  # oversampling makes the top-k estimate accurate
        gen = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(m @ torch.randn(cols, q, generator=gen, dtype=m.dtype)).Q
        for _ in range(2):  # power iterations sharpen a slowly decaying spectrum
            basis = torch.linalg.qr(m @ (m.T @ basis)).Q
        u_small, s, _ = torch.linalg.svd(basis.T @ m, full_matrices=False)
        u = basis @ u_small
    if s.numel() == 0 or float(s[0]) == 0.0:
        return u[:, :0]
    tol = float(s[0]) * max(rows, cols) * torch.finfo(torch.float32).eps
    k = min(k_max, int((s > tol).sum()))
    return u[:, :k]


def spectral_overlap(mats: Tensor, k_max: int = SPECTRAL_RANK, *,
                     max_dim: int = SPECTRAL_MAX_DIM) -> tuple[Tensor, Tensor]:
    """Pairwise overlap of the top singular subspaces of 2-D task matrices.

    overlap_ij = ||U_i^T U_j||_F^2 / min(k_i, k_j), U_i the top-k_i left singular
    vectors of mats[i], k_i = min(k_max, rank). Matrices with a side above
    `max_dim` are compared on the same evenly spaced sub-grid of rows and columns.

    Args:
        mats: (N, rows, cols) task matrices.

    Returns:
        (overlap, chance), both (N, N) float64 with NaN where a matrix is zero;
        chance_ij = max(k_i, k_j) / rows is the expected overlap of random subspaces.
    """
    rows, cols = mats.shape[1:]
    sub = mats[:, even_indices(rows, max_dim)][:, :, even_indices(cols, max_dim)] if max(rows, cols) > max_dim else mats
    bases = [top_left_singular(sub[i], k_max, seed=i) for i in range(sub.shape[0])]
    n, r = len(bases), sub.shape[1]
    overlap = torch.full((n, n), math.nan, dtype=torch.float64)
    chance = torch.full((n, n), math.nan, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            ki, kj = bases[i].shape[1], bases[j].shape[1]
            if ki and kj:
                overlap[i, j] = float((bases[i].T @ bases[j]).square().sum()) / min(ki, kj)
                chance[i, j] = max(ki, kj) / r
    return overlap, chance


@dataclasses.dataclass
class GeometrySums:
    """Running sums of the geometry of N task vectors over a set of tensors (a layer, a kind, the model).

    Pairwise cosines come from summed Gram matrices, so they are those of the
    concatenated tensors; spectral overlaps are averaged over the 2-D tensors.
    """

    n_models: int
    n_tensors: int = 0
    n_params: int = 0
    ref_sq: float = 0.0  # |theta_ref|^2: the base, or the mean of the models
    conflicts: list[float] = dataclasses.field(default_factory=lambda: [0, 0, 0.0])  # conflicts, contested, chance
    trimmed: list[float] = dataclasses.field(default_factory=lambda: [0, 0, 0.0])  # the same after trimming
    # Tensors below are zeros of the right shape until tensor_geometry or add() fills them.
    weight_gram: Tensor = dataclasses.field(init=False)  # (N, N) float64
    task_gram: Tensor = dataclasses.field(init=False)  # (N, N) float64
    mass_total: Tensor = dataclasses.field(init=False)  # (N,) L1 mass of each task vector
    mass_kept: dict[float, Tensor] = dataclasses.field(init=False)  # density -> (N,)
    overlap_sum: Tensor = dataclasses.field(init=False)  # (N, N) sum over 2-D tensors where defined
    overlap_count: Tensor = dataclasses.field(init=False)  # (N, N) how many tensors were summed
    chance_sum: Tensor = dataclasses.field(init=False)  # (N, N) summed chance levels of the same

    def __post_init__(self) -> None:
        n = self.n_models
        self.weight_gram = torch.zeros(n, n, dtype=torch.float64)
        self.task_gram = torch.zeros(n, n, dtype=torch.float64)
        self.mass_total = torch.zeros(n, dtype=torch.float64)
        self.mass_kept = {d: torch.zeros(n, dtype=torch.float64) for d in MASS_DENSITIES}
        self.overlap_sum = torch.zeros(n, n, dtype=torch.float64)
        self.overlap_count = torch.zeros(n, n, dtype=torch.float64)
        self.chance_sum = torch.zeros(n, n, dtype=torch.float64)

    def set_overlap(self, overlap: Tensor, chance: Tensor) -> None:
        """Record one tensor's spectral overlap and its chance level (spectral_overlap's output)."""
        defined = ~overlap.isnan()
        self.overlap_sum = torch.where(defined, overlap, 0.0)
        self.overlap_count = defined.double()
        self.chance_sum = torch.where(defined, chance, 0.0)

    def add(self, other: GeometrySums) -> None:
        """Add another set of sums (e.g. one tensor's) into this one."""
        self.n_tensors += other.n_tensors
        self.n_params += other.n_params
        self.ref_sq += other.ref_sq
        for mine, theirs in ((self.conflicts, other.conflicts), (self.trimmed, other.trimmed)):
            for i in range(3):
                mine[i] += theirs[i]
        for name in ("weight_gram", "task_gram", "mass_total", "overlap_sum", "overlap_count", "chance_sum"):
            getattr(self, name).add_(getattr(other, name))
        for d in MASS_DENSITIES:
            self.mass_kept[d].add_(other.mass_kept[d])


def tensor_geometry(weights: Tensor, reference: Tensor, density: float, *, spectral: bool = True,
                    profile: MagnitudeProfile | None = None) -> GeometrySums:
    """The geometry sums of one tensor name: the readable reference of the compiled pass.

    Args:
        weights: (N, *shape) float32 weights of the N models; not modified.
        reference: (*shape) the base tensor, or the models' mean when there is no base.
        density: share kept by the TIES-style trim before the second sign-conflict count.
        spectral: compute spectral overlap for 2-D tensors (skipped for embeddings, say).
        profile: the trim threshold and mass shares (magnitude_profile); computed here when not given.
    """
    if profile is None:
        profile = magnitude_profile(list(weights), reference, density)
    sums = GeometrySums(weights.shape[0], n_tensors=1, n_params=reference.numel())
    sums.weight_gram = gram(weights)
    sums.ref_sq = float(reference.double().square().sum())
    deltas = weights - reference  # (N, *shape)
    sums.task_gram = gram(deltas)
    sums.conflicts = list(sign_conflicts(deltas))
    sums.trimmed = list(sign_conflicts(trim_top_magnitude(deltas, density, profile.threshold)))
    sums.mass_total = deltas.reshape(deltas.shape[0], -1).abs().sum(dim=1, dtype=torch.float64)
    sums.mass_kept = {d: profile.mass_share[:, c] * sums.mass_total for c, d in enumerate(MASS_DENSITIES)}
    if spectral and deltas.dim() == 3:
        sums.set_overlap(*spectral_overlap(deltas))
    return sums


# ----------------------------------------------------------------------------- summaries

"""Spectral merges: TSV-M, Iso-C and Iso-CTS act on the singular vectors of task matrices.

For a 2-D weight the task matrix of model i is Delta_i = theta_i - theta_base, shape (m, n),
r = min(m, n). TSV-M keeps each task's leading singular directions and decorrelates them;
Iso-C flattens the spectrum of the summed task matrix; Iso-CTS flattens the spectrum of a
basis built from the sum's leading directions plus each task's own leftover directions.

Tensors that are not 2-D (biases, norms, conv kernels) have no singular vectors. Every method
here merges them as the authors' code does: theta_base + alpha * mean_i Delta_i (the mean, not
the sum, of the task vectors).

Numerics shared by the three methods:
- A singular direction whose value is at or below the numerical-rank tolerance
  tol = max(m, n) * eps * sigma_max (eps of the input dtype, numpy.linalg.matrix_rank's rule)
  is treated as absent. The vectors of a zero singular value are an arbitrary basis of a null
  space, so keeping them would make the result depend on the LAPACK build; on full-rank task
  matrices nothing is dropped and the result equals the authors'.
- Float32 inputs: the SVD comes from the eigendecomposition of the float64 Gram matrix on the
  smaller side: mostly matrix products, ~1.4x faster than a float32 torch.linalg.svd of a
  5632 x 2048 matrix on one CPU core, and at least as accurate for every direction above the
  tolerance. Float64 inputs use
  torch.linalg.svd(full_matrices=False) in float64. Results are returned in the input's
  precision (float32, or float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from mergelab.errors import MergeError, RecipeError, ShapeMismatch
from mergelab.methods.registry import MethodParams, NoParams, PerModel, merge_method

_EPS64 = torch.finfo(torch.float64).eps


class TsvParams(MethodParams):
    """Shared parameters of tsv."""

    alpha: float = Field(1.0, description="scale of the merged task matrix added to the base (paper: 1.0)")
    rank_fraction: float | None = Field(
        None, gt=0, le=1,
        description="share of min(m, n) kept per task; at most 1/N (default: 1/N, as in the paper)",
    )


class IsoCParams(MethodParams):
    """Shared parameters of iso_c."""

    alpha: float = Field(
        1.0, description="scale of the merged task matrix added to the base (tuned in the paper)"
    )


class IsoCtsParams(IsoCParams):
    """Shared parameters of iso_cts."""

    common_space_fraction: float = Field(
        0.8, ge=0, le=1, description="share of min(m, n) given to the common subspace (paper: 0.8)"
    )


# ---------------------------------------------------------------------------------------------
# Linear-algebra helpers


def numerical_svd(a: Tensor, eps: float, *, floor: float = 0.0, top: int | None = None):
    """Thin SVD restricted to the numerical rank: a ~= U diag(S) Vh.

    Args:
        a: (m, n) float64 matrix.
        eps: relative precision of the data ``a`` was made from (float32's or float64's
            machine epsilon); float64's selects torch.linalg.svd, anything coarser the
            Gram route.
        floor: scale the tolerance is measured against when larger than sigma_max(a); pass
            the size of the matrix ``a`` was derived from, so that rounding left over by a
            subtraction is not mistaken for structure.
        top: keep at most this many leading directions (the rest are never formed).

    Returns:
        U (m, k), S (k,) descending and > tol, Vh (k, n), all float64; k <= min(m, n, top).
    """
    m, n = a.shape
    limit = min(m, n) if top is None else min(m, n, top)
    if limit == 0:
        return a.new_zeros(m, 0), a.new_zeros(0), a.new_zeros(0, n)
    if eps <= _EPS64:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        k = _kept(s, max(m, n) * eps * max(float(s[0]), floor), limit)
        return u[:, :k], s[:k], vh[:k]
    wide = m < n
    gram = a @ a.T if wide else a.T @ a  # (r, r) on the smaller side
    lam, vecs = torch.linalg.eigh(gram)  # ascending
    s = lam.flip(0).clamp_min(0).sqrt()
    k = _kept(s, max(m, n) * eps * max(float(s[0]), floor), limit)
    s, vecs = s[:k], vecs.flip(1)[:, :k]
    if wide:
        return vecs, s, (vecs.T @ a) / s[:, None]  # (m, k), (k,), (k, n)
    return (a @ vecs) / s, s, vecs.T


def _kept(s: Tensor, tol: float, limit: int) -> int:
    """Number of leading entries of the descending ``s`` above ``tol``, at most ``limit``."""
    return min(int((s > tol).sum()), limit)


def procrustes_orthogonalize(mat: Tensor, eps: float) -> Tensor:
    """Nearest matrix with orthonormal columns (orthogonal Procrustes): P Q^T for mat = P Sigma Q^T.

    Directions of ``mat`` below the numerical-rank tolerance are left out, so for
    linearly dependent columns (e.g. two tasks sharing a singular vector) the result is the
    well-defined partial isometry on mat's range instead of an arbitrary completion.

    Args:
        mat: (m, K) float64, typically concatenated singular vectors of several tasks.
        eps: relative precision of the data, as in `numerical_svd`.

    Returns:
        (m, K) float64 with Q^T Q = I on mat's range (exactly I when mat has full column rank).
    """
    p, _, qh = numerical_svd(mat, eps)
    return p @ qh


# ---------------------------------------------------------------------------------------------
# Shared plumbing


def _check(name: str, x: Tensor, base: Tensor | None) -> None:
    if base is None:
        raise MergeError(f"{name} merges task matrices theta_i - theta_base: set `base_model:` in the recipe")
    if tuple(x.shape[1:]) != tuple(base.shape):
        raise ShapeMismatch(
            f"{name}: the models' tensors have shape {tuple(x.shape[1:])} but the base has "
            f"{tuple(base.shape)}; merge only checkpoints of the same architecture"
        )


def _check_finite(name: str, x: Tensor, base: Tensor) -> None:
    # A NaN or Inf makes the SVD undefined (LAPACK would fail with an opaque message).
    if not (torch.isfinite(x).all() and torch.isfinite(base).all()):
        raise MergeError(
            f"{name}: a model or the base holds NaN or Inf in this {tuple(base.shape)} tensor, so its "
            "singular vectors are undefined; check the checkpoints for corrupt values"
        )


def _precision(x: Tensor) -> tuple[torch.dtype, float]:
    """Output dtype and the relative precision of the data: float64 stays float64, all else float32."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return dtype, torch.finfo(dtype).eps


class TaskMatrices:
    """The task matrices theta_i - theta_base in float64, made one at a time on each pass.

    Re-iterable and sized like a list (the helpers below accept either), but holds no
    float64 copies: N of them would take twice the memory of x itself. Float32 differences
    taken in float64 carry rounding far below float32's, so the tolerance still sees zeros.
    """

    def __init__(self, x: Tensor, base: Tensor):
        self.x, self.base = x, base.to(torch.float64)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __iter__(self):
        return (row.to(torch.float64) - self.base for row in self.x)  # each (m, n), new


def _summed(deltas) -> Tensor:
    """sum_i Delta_i as a new tensor; the inputs are left untouched."""
    total = None
    for d in deltas:
        total = d.clone() if total is None else total.add_(d)
    return total


def _add_to_base(base: Tensor, delta: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    return base.to(dtype) + (alpha * delta).to(dtype)


def _mean_task_vector(x: Tensor, base: Tensor, alpha: float, dtype: torch.dtype) -> Tensor:
    """theta_base + alpha * mean_i (theta_i - theta_base), the rule for non-matrix tensors."""
    delta = (x.to(dtype) - base.to(dtype)).mean(dim=0)  # (*shape), a new tensor
    return base.to(dtype) + alpha * delta


# ---------------------------------------------------------------------------------------------
# The three merges of one task matrix stack; each returns the merged delta (m, n) in float64.


def tsv_delta(deltas, k: int, eps: float) -> Tensor:
    """TSV-M on task matrices (a list or `TaskMatrices`): top-k of each, whitened bases. See `tsv`."""
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = numerical_svd(d, eps, top=k)  # (m, k'), (k',), (k', n), k' <= k
        us.append(u), ss.append(s), vhs.append(vh)
    s_cat = torch.cat(ss)  # (K,)
    u_hat = procrustes_orthogonalize(torch.cat(us, dim=1), eps)  # (m, K)
    v_hat = procrustes_orthogonalize(torch.cat(vhs, dim=0).T, eps)  # (n, K)
    return (u_hat * s_cat) @ v_hat.T  # zeros when nothing was kept (K = 0)


def iso_c_delta(deltas, eps: float) -> Tensor:
    """Iso-C on task matrices (a list or `TaskMatrices`): flat spectrum of the sum. See `iso_c`."""
    u, s, vh = numerical_svd(_summed(deltas), eps)
    if s.numel() == 0:
        return u @ vh  # (m, n) zeros: the sum is zero
    return s.mean() * (u @ vh)


def iso_cts_split(r: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Sizes (k_common, k_per_task) with k_common + n_tasks * k_per_task = r, as the authors do."""
    k_common = int(r * common_space_fraction)
    # Python's round (ties to even) like the authors' code, then capped: round can overshoot r.
    per_task = min(round((r - k_common) / n_tasks), r // n_tasks)
    return r - n_tasks * per_task, per_task


def iso_cts_delta(deltas, common_space_fraction: float, eps: float) -> Tensor:
    """Iso-CTS on task matrices (a list or `TaskMatrices`): common + task bases. See `iso_cts`."""
    total = _summed(deltas)  # (m, n)
    k_common, per_task = iso_cts_split(min(total.shape), len(deltas), common_space_fraction)
    u, s, vh = numerical_svd(total, eps, top=k_common)  # (m, kc), (kc,), (kc, n)
    del total
    us, ss, vhs = [u], [s], [vh]
    if per_task > 0:
        for d in deltas:
            residual = d - u @ (u.T @ d)  # (m, n): d outside the common left subspace
            # Measured against ||d||_F so a task lying inside the common subspace leaves only
            # rounding behind, which must not count as task-specific directions.
            ut, st, vht = numerical_svd(residual, eps, floor=float(d.norm()), top=per_task)
            us.append(ut), ss.append(st), vhs.append(vht)
    s_cat = torch.cat(ss)  # (K,)
    u_hat = procrustes_orthogonalize(torch.cat(us, dim=1), eps)  # (m, K)
    v_hat = procrustes_orthogonalize(torch.cat(vhs, dim=0).T, eps)  # (n, K)
    if s_cat.numel() == 0:
        return u_hat @ v_hat.T  # (m, n) zeros: every task matrix is zero
    return s_cat.mean() * (u_hat @ v_hat.T)


# ---------------------------------------------------------------------------------------------
# Registered methods


def _tsv_rank(r: int, n_tasks: int, fraction: float | None) -> int:
    if fraction is None:
        return r // n_tasks  # exact 1/N; int(r * (1 / N)) can lose one to rounding (r = N = 49)
    if fraction * n_tasks > 1 + 1e-9:
        raise RecipeError(
            f"tsv: rank_fraction {fraction} with {n_tasks} models keeps {fraction * n_tasks:.3g} times "
            f"the rank of each matrix; use at most 1/{n_tasks} (or leave rank_fraction unset for 1/N)"
        )
    return int(r * fraction + 1e-9)  # the slack absorbs float error in r * fraction


@merge_method("tsv", shared_params=TsvParams, base="required")
def tsv(x: Tensor, base: Tensor, p: PerModel[NoParams], s: TsvParams, gen=None) -> Tensor:
    """Task Singular Vectors merge (TSV-M): keep each task's top singular directions, decorrelate, sum.

    For a 2-D weight, with Delta_i = theta_i - theta_base = U_i S_i V_i^T and k = floor(f r):
        U = [U_1[:, :k] ... U_N[:, :k]], S = diag(S_1[:k] ... S_N[:k]), V likewise (m x Nk),
        U_hat = P Q^T for U = P Sigma Q^T (orthogonal Procrustes), V_hat the same for V,
        theta = theta_base + alpha * U_hat S V_hat^T.
    When the tasks' directions are already orthogonal the result is base + alpha * sum of the
    truncated task matrices; N identical fine-tunes give base + alpha * (best rank-k approximation
    of Delta). A matrix with k = 0 (r < N) and every tensor that is not 2-D get
    theta_base + alpha * mean_i Delta_i. Singular values at or below the numerical-rank tolerance
    are left out (module docstring). FusionBench's TaskSingularVectorMerging(alpha) gives the same
    tensors within float32 rounding where no task matrix is rank-deficient (it keeps directions
    below the tolerance too, and takes its SVDs in float32: ~1e-6 of the weights on fast-decaying spectra).
    Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodola, 2025, "Task Singular Vectors:
    Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081.

    Shared parameters: alpha (1.0, the paper's value); rank_fraction f (None: 1/N, the paper's
    choice; at most 1/N so that the N kept blocks fit in r directions). No per-model parameters.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters (none).
        s: shared parameters.
        gen: unused (deterministic).

    Returns:
        (*shape) merged weights, float32 (float64 for float64 inputs).
    """
    _check("tsv", x, base)
    dtype, eps = _precision(x)
    n_tasks = x.shape[0]
    k = _tsv_rank(min(base.shape), n_tasks, s.rank_fraction) if base.dim() == 2 else 0
    if base.dim() != 2 or k == 0:
        return _mean_task_vector(x, base, s.alpha, dtype)
    _check_finite("tsv", x, base)
    return _add_to_base(base, tsv_delta(TaskMatrices(x, base), k, eps), s.alpha, dtype)


@merge_method("iso_c", shared_params=IsoCParams, base="required")
def iso_c(x: Tensor, base: Tensor, p: PerModel[NoParams], s: IsoCParams, gen=None) -> Tensor:
    """Isotropic merging in the common subspace (Iso-C): the summed task matrix with a flat spectrum.

    For a 2-D weight, with sum_i Delta_i = U S V^T (thin SVD, numerical rank q):
        theta = theta_base + alpha * sigma_bar U V^T,  sigma_bar = (1/q) sum_j S_jj,
    so the merged update keeps the nuclear norm of the task-arithmetic sum and weighs every
    direction alike. N identical fine-tunes give base + alpha * N mean(S(Delta)) U V^T with
    U, V those of Delta. Tensors that are not 2-D get theta_base + alpha * mean_i Delta_i.
    The authors average over all r = min(m, n) singular values; for full-rank sums this is
    the same, for rank-deficient sums we leave out the zero ones (module docstring). So does
    FusionBench's IsotropicMergingInCommonSubspace (scaling_factor = alpha), which also spreads
    sigma_bar over the sum's null directions: for a sum of rank q < r this update is (r / q) times
    FusionBench's projected onto the q nonzero singular directions; full-rank sums agree to float32 rounding.
    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, 2025, "No Task Left Behind:
    Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959.

    Shared parameters: alpha (1.0). The paper tunes alpha on held-out validation data (the
    authors' code sweeps 0.1 to 3.0) and states no fixed value; 1.0 is FusionBench's default.
    No per-model parameters.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters (none).
        s: shared parameters.
        gen: unused (deterministic).

    Returns:
        (*shape) merged weights, float32 (float64 for float64 inputs).
    """
    _check("iso_c", x, base)
    dtype, eps = _precision(x)
    if base.dim() != 2:
        return _mean_task_vector(x, base, s.alpha, dtype)
    _check_finite("iso_c", x, base)
    return _add_to_base(base, iso_c_delta(TaskMatrices(x, base), eps), s.alpha, dtype)


@merge_method("iso_cts", shared_params=IsoCtsParams, base="required")
def iso_cts(x: Tensor, base: Tensor, p: PerModel[NoParams], s: IsoCtsParams, gen=None) -> Tensor:
    """Isotropic merging in common and task-specific subspaces (Iso-CTS).

    For a 2-D weight, r = min(m, n), f = common_space_fraction:
        k_c = r - N k_t, k_t = round((r - floor(f r)) / N)  (so the task blocks divide evenly);
        U_c S_c V_c^T = top-k_c SVD of sum_i Delta_i               (common subspace);
        U_i S_i V_i^T = top-k_t SVD of (I - U_c U_c^T) Delta_i      (task-specific, per task);
        U = [U_c U_1 ... U_N], V likewise, S = [S_c S_1 ... S_N];
        U_hat, V_hat = orthogonal Procrustes of U, V (P Q^T from their SVDs);
        theta = theta_base + alpha * mean(S) U_hat V_hat^T.
    With f = 1 this is Iso-C. Tensors that are not 2-D get theta_base + alpha * mean_i Delta_i.
    As in Iso-C, singular values at or below the numerical-rank tolerance are left out of the
    bases and of the mean (module docstring). FusionBench's IsotropicMergingInCommonAndTaskSubspace
    gives the same tensors within float32 rounding, except that it does not cap k_t: where
    N round((r - floor(f r)) / N) > r (r = 11, N = 2, f = 0) its common size is negative and it fails.
    Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, 2025, "No Task Left Behind:
    Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959.

    Shared parameters: alpha (1.0; tuned on validation data in the paper, FusionBench's default);
    common_space_fraction f (0.8, the paper's value). No per-model parameters.

    Args:
        x: (N, *shape) the fine-tuned models' tensors.
        base: (*shape) the base model's tensor.
        p: per-model parameters (none).
        s: shared parameters.
        gen: unused (deterministic).

    Returns:
        (*shape) merged weights, float32 (float64 for float64 inputs).
    """
    _check("iso_cts", x, base)
    dtype, eps = _precision(x)
    if base.dim() != 2:
        return _mean_task_vector(x, base, s.alpha, dtype)
    _check_finite("iso_cts", x, base)
    delta = iso_cts_delta(TaskMatrices(x, base), s.common_space_fraction, eps)
    return _add_to_base(base, delta, s.alpha, dtype)

"""Exact low-rank algebra for merging LoRA updates.

A linear-type merge of LoRA updates stays low-rank:

    sum_i c_i B_i A_i = [c_1 B_1 | ... | c_N B_N] @ [A_1; ...; A_N] = B_cat @ A_cat      (K = sum_i r_i)

so the merged update is held as two factors, never as an (m, n) matrix. Its best
rank-R approximation (Eckart-Young) comes from thin QR factorisations of the
stacked factors and the SVD of a K x K core (`truncate_factored`): O((m + n) K^2)
work instead of the O(m n min(m, n)) of a dense SVD. Methods that act entrywise on
the update (TIES, DARE, magnitude pruning) need it dense; `truncate_dense` then
truncates an (m, n) matrix with a full SVD, one layer at a time.
"""

from __future__ import annotations

import torch

__all__ = ["stack_factors", "truncate_factored", "truncate_dense", "split_singular"]


def stack_factors(bs: list[torch.Tensor], as_: list[torch.Tensor], coefs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenation of N low-rank updates: (B_cat, A_cat) with B_cat @ A_cat = sum_i c_i B_i A_i.

    The coefficient multiplies B_i only, so negative coefficients are exact (no square
    roots of weights, unlike combining A and B separately).

    Args:
        bs: (m, r_i) factors.  as_: (r_i, n) factors.  coefs: c_i.
    Returns:
        B_cat (m, K), A_cat (K, n) with K = sum_i r_i.
    """
    b = torch.cat([c * b for c, b in zip(coefs, bs)], dim=1)  # (m, K)
    a = torch.cat(list(as_), dim=0)  # (K, n)
    return b, a


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U S Vh -> (B, A) = (U sqrt(S), sqrt(S) Vh): the two factors equally scaled."""
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh


def truncate_factored(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of B @ A without forming it.

        B = Q_b R_b, A^T = Q_a R_a (thin QR);  R_b R_a^T = U S V^T (K x K);
        B A = (Q_b U) S (Q_a V)^T, truncated to the top `rank` singular values.

    Eckart & Young, 1936. The core SVD runs in float64 (it is small); the result is
    the optimal truncation up to float32 rounding of the QR factors.

    Args:
        b: (m, K).  a: (K, n).  rank: R >= 1.
    Returns:
        (B_R (m, R'), A_R (R', n), S (min(m, n, K),) all singular values of B A), R' = min(R, K).
    """
    qb, rb = torch.linalg.qr(b)  # (m, p), (p, K)
    qa, ra = torch.linalg.qr(a.T)  # (n, q), (q, K)
    core = rb.double() @ ra.double().T  # (p, q)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, s.shape[0])
    u_k = qb @ u[:, :k].to(qb.dtype)  # (m, k)
    v_k = (qa @ vh[:k].T.to(qa.dtype)).T  # (k, n)
    bk, ak = split_singular(u_k, s[:k].to(qb.dtype), v_k)
    return bk, ak, s.to(b.dtype)


def truncate_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of a dense (m, n) update: a full SVD, truncated.

    Returns:
        (B_R (m, R), A_R (R, n), S all singular values).
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    bk, ak = split_singular(u[:, :k], s[:k], vh[:k])
    return bk, ak, s


def captured_energy(s: torch.Tensor, rank: int) -> float:
    """Share of the update's squared Frobenius norm kept by its top `rank` singular values."""
    total = float((s.double() ** 2).sum())
    return 1.0 if total == 0 else float((s[:rank].double() ** 2).sum()) / total


def knots_basis(bs: list[torch.Tensor], as_: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KnOTS: a shared SVD basis for N low-rank updates, without forming any of them.

        [B_1 A_1 | ... | B_N A_N] = U S [V_1^T | ... | V_N^T],   so  B_i A_i = (U S) V_i^T.

    B_cat = Q_b R_b and A_i^T = Q_i R_i (thin QR); the K x K core R_b blockdiag(R_i)^T = U' S V'^T;
    then U S = Q_b U' S and V_i^T = V'^T[:, block i] Q_i^T. Stoica, Ramesh, Ecsedi, Choshen,
    Hoffman, 2024, "Model merging with SVD to tie the KnOTS", arXiv:2410.19735.

    Args:
        bs: (m, r_i) factors.  as_: (r_i, n) factors.
    Returns:
        US (m, k) and the list of V_i^T (k, n), k = min(m, K), K = sum_i r_i.
    """
    qb, rb = torch.linalg.qr(torch.cat(bs, dim=1))  # (m, p), (p, K)
    qs, rs = zip(*[torch.linalg.qr(a.T) for a in as_])  # (n, q_i), (q_i, r_i)
    core = rb.double() @ torch.block_diag(*[r.double() for r in rs]).T  # (p, sum q_i)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (p, k), (k,), (k, sum q_i)
    us = qb @ (u * s).to(qb.dtype)  # (m, k)
    vts, start = [], 0
    for q in qs:
        vts.append(vh[:, start:start + q.shape[1]].to(q.dtype) @ q.T)  # (k, n)
        start += q.shape[1]
    return us, vts

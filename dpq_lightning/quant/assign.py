"""Assignment rules: which codeword each sub-vector uses, given the (current) codebooks.

* ``nearest``: ``argmin_k |w - c_k|^2`` - weight-space error.
* ``output_aware`` (DPQ's forward-pass adjustment, our reconstruction): ``argmin_k
  (w - c_k)^T H (w - c_k)`` where ``w`` is the teacher's sub-vector and ``H = E[x x^T]`` the second
  moment of the layer's inputs over the ``d`` columns that sub-vector multiplies. For one output
  row, the output error is ``sum_m (w_m - c_m)^T x_m``; its expected square is
  ``sum_m (w_m - c_m)^T H_m (w_m - c_m)`` plus cross-block terms this rule ignores (as PQ does).
  With ``H = I`` it is ``nearest``.

Limited reassignment (PV-tuning's discrete step, our reading): of the codes a rule would change in
a layer, only the ``fraction`` with the largest gain in the rule's own objective change in one
pass (:func:`limit_changes`), so codebooks tuned for the old codes are not pulled away at once.

``H`` is given per column block: ``[M, d, d]``. A small damping ``lambda * mean(diag H) * I`` keeps
blocks with (near-)zero input energy well posed; it pulls the rule toward ``nearest`` there.
"""

from __future__ import annotations

import torch

from .geometry import Geometry
from .kmeans import DEFAULT_CHUNK_BYTES, nearest


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag(H)) * I`` per block: ``[M, d, d] -> [M, d, d]``."""
    d = H.shape[-1]
    eye = torch.eye(d, dtype=H.dtype, device=H.device)
    scale = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)  # (M,)
    return H + damp * scale[:, None, None] * eye


def group_moments(H: torch.Tensor, geo: Geometry, G: int) -> torch.Tensor:
    """Each group's moments ``[G, gc, d, d]`` from the per-column-block ``H [M, d, d]``. Group g =
    (row block, column-block block cbb) with cbb = g % (M / gc); it spans column blocks cbb*gc ..
    cbb*gc + gc - 1, and its sub-vector n = r*gc + j sits in block cbb*gc + j."""
    gc, M, d = geo.group_cols, geo.col_blocks, H.shape[-1]
    cbb = torch.arange(G, device=H.device) % (M // gc)  # (G,)
    return H.reshape(M // gc, gc, d, d)[cbb]


def assign_output_aware(
    X: torch.Tensor,
    C: torch.Tensor,
    H: torch.Tensor,
    geo: Geometry,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> torch.Tensor:
    """Codes minimising ``(w - c)^T H_m (w - c)``.

    Args:
        X: teacher sub-vectors ``[G, N, d]`` laid out by ``geo``.
        C: codebooks ``[G, K, d]``.
        H: symmetric second moments per column block ``[M, d, d]`` (already damped).

    Returns:
        codes ``[G, N]`` (int64).
    """
    G, N, d = X.shape
    K = C.shape[1]
    gr, gc = geo.group_rows, geo.group_cols
    X, C, H = X.float(), C.float(), H.float()
    Hg = group_moments(H, geo, G)  # (G, gc, d, d)
    HC = torch.einsum("gjde,gke->gjkd", Hg, C)  # (G, gc, K, d): H_j c_k
    Q = (HC * C.unsqueeze(1)).sum(-1)  # (G, gc, K): c_k^T H_j c_k
    Xr = X.reshape(G, gr, gc, d)  # (G, gr, gc, d)
    codes = torch.empty(G, gr, gc, dtype=torch.long, device=X.device)
    step = max(1, min(gr, max_chunk_bytes // max(1, G * gc * K * 4)))
    for s in range(0, gr, step):
        x = Xr[:, s : s + step]  # (G, r, gc, d)
        cross = torch.einsum("grjd,gjkd->grjk", x, HC)  # (G, r, gc, K): w^T H c
        codes[:, s : s + step] = (Q.unsqueeze(1) - 2 * cross).argmin(-1)
    return codes.reshape(G, N)


def code_cost(X: torch.Tensor, C: torch.Tensor, codes: torch.Tensor, geo: Geometry,
              H: torch.Tensor | None = None) -> torch.Tensor:
    """The rule's objective of given ``codes [G, N]``: ``(w - c)^T H_m (w - c)`` per sub-vector
    ``[G, N]`` (``H [M, d, d]``, already damped), or ``|w - c|^2`` when ``H`` is None."""
    G, N, d = X.shape
    diff = X.float() - torch.gather(C.float(), 1, codes.long().unsqueeze(-1).expand(G, N, d))  # (G, N, d)
    if H is None:
        return diff.pow(2).sum(-1)
    gr, gc = geo.group_rows, geo.group_cols
    Hg = group_moments(H.float(), geo, G)  # (G, gc, d, d)
    diff = diff.reshape(G, gr, gc, d)
    return torch.einsum("grjd,gjde,grje->grj", diff, Hg, diff).reshape(G, N)


def limit_changes(old: torch.Tensor, new: torch.Tensor, gain: torch.Tensor, fraction: float) -> torch.Tensor:
    """Codes ``[G, N]`` equal to ``old`` except at the ``round(fraction * old.numel())`` places
    (at most) where ``new`` differs with the largest positive ``gain = cost(old) - cost(new)``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction of codes to change must be in (0, 1], got {fraction}")
    old, new = old.long(), new.long()
    score = torch.where((new != old) & (gain > 0), gain.float(), torch.full_like(gain, -1.0, dtype=torch.float32))
    k = min(round(fraction * old.numel()), int((score > 0).sum()))
    out = old.clone().reshape(-1)
    if k > 0:
        top = score.reshape(-1).topk(k).indices  # (k,)
        out[top] = new.reshape(-1)[top]
    return out.reshape(old.shape)


def assign(
    rule: str,
    X: torch.Tensor,
    C: torch.Tensor,
    geo: Geometry,
    H: torch.Tensor | None = None,
    damp: float = 0.01,
) -> torch.Tensor:
    """Dispatch by rule name: ``"nearest"`` or ``"output_aware"`` (needs ``H [M, d, d]``)."""
    if rule == "nearest" or (rule == "output_aware" and H is None):
        return nearest(X.float(), C.float())[0]
    if rule == "output_aware":
        return assign_output_aware(X, C, damped(H, damp), geo)
    raise ValueError(f"unknown assignment rule {rule!r}; expected 'nearest' or 'output_aware'")

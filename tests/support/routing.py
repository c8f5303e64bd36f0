"""What the routing tests share: an exact normal null on a fine grid, the Selection contract's check,
independent references (scipy BH, a looped higher criticism) and calibration logits with known shape."""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import false_discovery_control, norm

from routelab.routing.nulls import TabulatedNull

# A null whose survival function is the standard normal's: p = norm.sf(logit), up to interpolation.
GRID = np.linspace(-10.0, 10.0, 2001).astype(np.float32)


NORMAL_SF = norm.sf(GRID.astype(np.float64)).astype(np.float32)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def normal_null(num_experts: int, layers: int = 1) -> TabulatedNull:
    return TabulatedNull(grid=np.tile(GRID, (layers, 1)), sf=np.tile(NORMAL_SF, (layers, 1)),
                         num_experts=num_experts, min_pvalue=1e-30)


def check_selection(sel, num_experts: int, min_k: int, max_k: int) -> None:
    """The Selection contract: shapes, clamp, sentinel and zero weight in unused slots, unique experts."""
    tokens = sel.k.shape[0]
    assert sel.indices.shape == sel.weights.shape == (tokens, max_k)
    assert sel.indices.dtype == sel.k.dtype == torch.long and sel.weights.dtype == torch.float32
    assert ((sel.k >= min_k) & (sel.k <= max_k)).all()
    used = torch.arange(max_k) < sel.k.unsqueeze(-1)
    assert (sel.indices[~used] == num_experts).all() and (sel.weights[~used] == 0).all()
    assert ((sel.indices[used] >= 0) & (sel.indices[used] < num_experts)).all()
    assert (sel.weights >= 0).all() and torch.isfinite(sel.weights).all()
    one_hot = torch.zeros(tokens, num_experts + 1, dtype=torch.long).scatter_add_(
        -1, sel.indices, torch.ones_like(sel.indices))
    assert (one_hot[:, :num_experts] <= 1).all(), "an expert appears twice in one token's selection"


def check_selection_shape(sel, num_experts: int, min_k: int, max_k: int) -> None:
    """Invariants every Selection must satisfy."""
    tokens = sel.k.shape[0]
    assert sel.indices.shape == sel.weights.shape == (tokens, max_k)
    assert sel.indices.dtype == torch.long and sel.k.dtype == torch.long
    assert ((sel.k >= min_k) & (sel.k <= max_k)).all()
    used = torch.arange(max_k) < sel.k.unsqueeze(-1)
    assert (sel.indices[~used] == num_experts).all(), "unused slots must hold the sentinel"
    assert (sel.weights[~used] == 0).all(), "unused slots must have weight 0"
    assert (sel.indices[used] >= 0).all() and (sel.indices[used] < num_experts).all()
    assert (sel.weights >= 0).all()
    for t in range(tokens):
        chosen = sel.indices[t, : sel.k[t]].tolist()
        assert len(set(chosen)) == len(chosen), f"token {t}: duplicate experts {chosen}"


def scipy_bh_rejections(pvalues: np.ndarray, alpha: float) -> np.ndarray:
    """Number of BH rejections per row, from scipy's adjusted p-values."""
    return (false_discovery_control(pvalues, axis=-1, method="bh") <= alpha).sum(axis=-1)


def reference_hc_count(sorted_p: np.ndarray, alpha0: float) -> int:
    """Donoho-Jin HC argmax over the first floor(alpha0 N) ranks, looping; ties to the larger rank."""
    n = sorted_p.size
    searched = max(1, int(np.floor(alpha0 * n + 1e-9)))
    best_rank, best = 0, -np.inf
    for i in range(1, searched + 1):
        p = float(sorted_p[i - 1])
        if p == 0.0:
            score = np.inf
        elif p == 1.0:
            score = -np.inf
        else:
            score = np.sqrt(n) * (i / n - p) / np.sqrt(p * (1 - p))
        if score > -np.inf and score >= best:
            best_rank, best = i, score
    return best_rank


def reference_order(pvalues: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Experts per token by ascending p, ties by descending logit, then by expert index."""
    experts = np.arange(pvalues.shape[-1])
    return np.stack([np.lexsort((experts, -lg, p)) for p, lg in zip(pvalues, logits)])


EXPERTS = 6


# Expert 0 is habitually loud, expert 5 is quiet and wide; the rest are standard normal.
LOCATION = np.array([3.0, 0.0, 0.0, 0.0, 0.0, -1.0])


SCALE = np.array([0.5, 1.0, 1.0, 1.0, 1.0, 2.0])


def calibration_logits(seed: int, tokens: int = 2000, layers: int = 2) -> list[np.ndarray]:
    """``[tokens, experts]`` float32 logits per layer (float32: the dtype routing looks them up in)."""
    rng = np.random.default_rng(seed)
    return [(LOCATION + layer + SCALE * rng.standard_normal((tokens, EXPERTS))).astype(np.float32)
            for layer in range(layers)]

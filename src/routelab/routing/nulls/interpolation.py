"""Piecewise-linear interpolation on the device, as ``np.interp``: the tabulated nulls' p-values.

:func:`interpolate_rows` interpolates each row on its own knots (a binary search per value);
:class:`UniformSegments` does the same for evenly spaced knots by index arithmetic, built once per
curve and exactly equal to it where :func:`evenly_spaced` holds. Both keep every result between its
segment's end values, so a non-increasing table gives p-values that never rise with the logit (routers
rely on it).
"""

from __future__ import annotations

import numpy as np
import torch


def interpolate_rows(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise ``np.interp`` on device: ``x`` ``[rows, n]``, ``xp``/``fp`` ``[rows, points]``.

    ``xp`` rows must not decrease; repeated knots (ties in the data) are allowed after the first pair.
    Beyond the ends the end values are returned, as ``np.interp`` does. Each result lies between its
    segment's end values, so rows of ``fp`` that do not increase give results that never increase with
    ``x``, exactly (routers rely on it).
    """
    right = torch.searchsorted(xp, x).clamp_(1, xp.shape[-1] - 1)
    left = right - 1
    x0, x1, y0, y1 = xp.gather(-1, left), xp.gather(-1, right), fp.gather(-1, left), fp.gather(-1, right)
    width = x1 - x0
    t = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, 1.0), (x >= x1).to(x.dtype))
    # Kept between the segment's end values: float rounding could otherwise step past y1 by one ulp,
    # and with it a monotone ``fp`` would give a result that is not exactly monotone in ``x``.
    return (y0 + t.clamp_(0.0, 1.0) * (y1 - y0)).clamp_(torch.minimum(y0, y1), torch.maximum(y0, y1))


def evenly_spaced(xp: np.ndarray) -> np.ndarray:
    """Per curve of ``xp`` ``[..., points]``, whether its knots are evenly spaced closely enough for
    :class:`UniformSegments`: each within a quarter step of its place on the line through the ends.

    The segment guessed from the spacing is then at most one off (the correction's reach) with room to
    spare for float32 rounding of the guess. Returns bool ``[...]``.
    """
    xp = np.asarray(xp, dtype=np.float64)
    points = xp.shape[-1]
    if points < 2:  # no segment to guess
        return np.zeros(xp.shape[:-1], dtype=bool)
    start, end = xp[..., :1], xp[..., -1:]
    step = (end - start) / (points - 1)
    ideal = start + step * np.arange(points)
    return (step[..., 0] > 0) & (np.abs(xp - ideal).max(axis=-1) <= 0.25 * step[..., 0])


class UniformSegments:
    """:func:`interpolate` for knots ``xp`` evenly spaced (up to float rounding; :func:`evenly_spaced`),
    without a binary search; built once per curve, then called on ``x`` of any shape (routing does so per layer).

    ``xp`` / ``fp`` are one curve ``[points]`` or several ``[curves, points]`` (the layers of a null,
    whose p-values are then computed in one call); with several, ``x``'s first axis runs over the
    curves (``[curves, ...]``) and each slice is interpolated on its own curve, exactly as one curve would.

    The segment of ``x`` is computed from the spacing and corrected by one step against the stored
    knots, so the result equals the ``searchsorted`` one exactly, including at the knots. Per segment
    ``j`` (knots ``j`` and ``j + 1``) a table row holds what :func:`interpolate_rows` computes per value
    (left and right knot, width, left value, rise and the end values' range), with the same float
    operations, so a call is two row lookups (``index_select``) and a few elementwise passes.
    """

    def __init__(self, xp: torch.Tensor, fp: torch.Tensor):
        self.curves = None if xp.dim() == 1 else xp.shape[0]
        xp, fp = xp.reshape(-1, xp.shape[-1]), fp.reshape(-1, fp.shape[-1])  # [curves, points]
        self.last = xp.shape[-1] - 1

        x0, x1, y0, y1 = (part.reshape(-1) for part in (xp[:, :-1], xp[:, 1:], fp[:, :-1], fp[:, 1:]))
        width = x1 - x0
        positive = width > 0
        self.all_positive = bool(positive.all())
        # One row per segment (all curves' segments in turn), read with one index_select per lookup:
        # the knots to correct the guess by, then what the interpolation needs.
        self.knots = torch.stack([x0, x1], dim=-1)
        self.segments = torch.stack([x0, torch.where(positive, width, 1.0), y0, y1 - y0, torch.minimum(y0, y1),
                                     torch.maximum(y0, y1), x1, positive.to(x0.dtype)], dim=-1)
        self.start, self.scale = xp[:, :1], self.last / (xp[:, -1:] - xp[:, :1])  # [curves, 1]
        # where each curve's segments start in the tables, for the guess and (one less) for the corrected segment
        self.offset = torch.arange(0, xp.shape[0] * self.last, self.last, dtype=torch.int32, device=xp.device)[:, None]
        self.offset_before = self.offset - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.curves is not None and (x.dim() == 0 or x.shape[0] != self.curves):
            raise ValueError(f"x: expected a first axis of {self.curves} (one slice per curve), "
                             f"got shape {tuple(x.shape)}")
        rows = x.reshape(1 if self.curves is None else self.curves, -1)  # [curves, values]

        def lookup(table: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
            return table.index_select(0, (segment + offset).view(-1)).view(*rows.shape, table.shape[-1])

        # Segment j holds x in (knot j, knot j + 1] (searchsorted, side="left"; the first also what lies
        # below, the last what lies beyond): the guess is within one segment of it, and guess + [x > its
        # right knot] + [x > its left knot] - 1 is the segment (the - 1 is in offset_before).
        guess = ((rows - self.start) * self.scale).clamp_(0.0, float(self.last - 1)).floor_().int()
        knots = lookup(self.knots, guess, self.offset)
        segment = (guess + (rows > knots[..., 1])).add_(rows > knots[..., 0]).clamp_(1, self.last)
        x0, width, y0, rise, low, high, x1, positive = lookup(self.segments, segment, self.offset_before).unbind(-1)
        t = (rows - x0).div_(width)
        if not self.all_positive:  # repeated knots (ties in the data): a step at the knot
            t = torch.where(positive > 0, t, (rows >= x1).to(rows.dtype))
        return (y0 + t.clamp_(0.0, 1.0) * rise).clamp_(low, high).view(x.shape)


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` on device: ``x`` any shape, ``xp`` non-decreasing ``[points]``."""
    flat = x.reshape(1, -1)
    return interpolate_rows(flat, xp.reshape(1, -1), fp.reshape(1, -1)).reshape(x.shape)

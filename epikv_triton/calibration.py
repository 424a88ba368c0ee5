"""Calibration: the ``epikv`` bands, weights and signs chosen for one model (``docs/method.md`` section 8).

:func:`choose` takes a recording of calibration text, window by window (:class:`Window`: every layer's
residual-stream change and an importance oracle per token, from a full-cache run), and picks the two layer
bands and signed weights whose score ``w_A·z(a) − w_B·z(b)`` best finds the tokens the oracle ranks in its
top ``keep_fraction``, the share a bounded cache keeps. Transformers-free: recording a Hugging Face model is
:func:`epikv_triton.integrations.calibration.calibrate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import ops
from .config import EpiKVConfig

#: A candidate score: ``((band, coefficient), (band, coefficient))``, the sum of each band's z-score times its
#: coefficient; a band of coefficient 0 is empty.
Terms = tuple[tuple[tuple[int, ...], float], tuple[tuple[int, ...], float]]


@dataclass(frozen=True)
class Window:
    """One window of calibration text read with the full cache.

    * ``diffs``: ``[L, T]`` float32, ``diff_l[t] = ‖h_l[t] − h_l[t−1]‖₂`` per decoder layer ``l``; NaN at ``t = 0``.
    * ``oracle``: ``[T]`` float, each token's importance (higher = read more by later tokens); NaN where a token
      is not judged.
    """

    diffs: torch.Tensor
    oracle: torch.Tensor


@dataclass(frozen=True)
class Calibration:
    """What :func:`choose` picked, and how well it and the reference bands find the oracle's top tokens.

    * ``config``: the chosen :class:`~epikv_triton.EpiKVConfig` (method ``epikv``).
    * ``objective``: its precision: the share of its top ``keep_fraction`` of judged tokens that is in the
      oracle's top ``keep_fraction``, pooled over windows.
    * ``baselines``: the same precision for the ``epikv`` default bands and ``epikv_flat`` (``None`` when
      their bands do not fit the model), and ``chance``, what a random score gets in expectation.
    * ``windows``, ``judged_tokens``: how much evidence it rests on.
    """

    config: EpiKVConfig
    objective: float
    baselines: dict[str, float | None]
    windows: int
    judged_tokens: int

    def summary(self) -> str:
        """One line: the chosen bands and weights and the precision of each option."""
        (band_a, band_b), (w_a, w_b) = self.config.bands, self.config.weights
        others = ", ".join(f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                           for name, value in self.baselines.items())
        return (
            f"bands A={_layers(band_a)} (w_A {w_a:g}), B={_layers(band_b)} (w_B {w_b:g}): precision "
            f"{self.objective:.3f} ({others}) over {self.judged_tokens} tokens in {self.windows} windows"
        )


def choose(windows: Sequence[Window], *, keep_fraction: float = 0.25, pairs: int = 32, **settings: Any) -> Calibration:
    """The ``epikv`` bands, weights and signs that best find the oracle's top tokens in ``windows``.

    Candidates are one or two disjoint layer-contiguous bands with signed weights. Every band's mean
    change is z-scored once (``ops.rolling_zscore``, the scorer's window ``W``); a candidate's score is a
    linear combination of those z-scores. The default bands, ``epikv_flat``, every single band (signed
    as it correlates with the oracle's top) and the ``pairs`` pairs of bands whose least-squares fit of
    the "in the oracle's top ``keep_fraction``" indicator is best (its coefficients are the weights:
    every pair is solved at once in closed form) are compared by precision (:class:`Calibration`). The
    most precise is returned; on a tie the first in that order, so a pair must beat its parts.

    Args:
        windows: the recording; every window has the same number of layers.
        keep_fraction: the share of judged tokens counted as kept, in ``(0, 1)``.
        pairs: how many of the best-fitting pairs of bands are compared by precision.
        settings: further :class:`~epikv_triton.EpiKVConfig` keywords of the returned config (``budget``,
            ``window``, ...), not ``method``, ``bands`` or ``weights``, which are chosen here.
    """
    chosen_here = sorted({"method", "bands", "weights"} & set(settings))
    if chosen_here:
        raise ValueError(f"calibration chooses {', '.join(chosen_here)}; pass only the other EpiKVConfig settings")
    if not 0 < keep_fraction < 1:
        raise ValueError(f"keep_fraction must be in (0, 1), got {keep_fraction!r}")
    if pairs < 0:
        raise ValueError(f"pairs must be a non-negative int, got {pairs!r}")
    base = EpiKVConfig(method="epikv", **settings)
    evidence = _Evidence(windows, base.window, keep_fraction)
    references = {name: _reference_terms(name, evidence.num_layers) for name in ("epikv", "epikv_flat")}
    candidates = [terms for terms in references.values() if terms is not None] + evidence.candidates(pairs)
    precision = {terms: evidence.precision(terms) for terms in candidates}
    best = max(candidates, key=precision.__getitem__)  # the first of equals
    baselines = {name: None if terms is None else precision[terms] for name, terms in references.items()}
    baselines["chance"] = evidence.chance
    config = dataclasses.replace(base, **_bands_and_weights(best))
    return Calibration(config, precision[best], baselines, evidence.windows, evidence.judged_tokens)


class _Evidence:
    """Every contiguous band's z-scored mean change at the judged tokens, pooled over windows, with the oracle's
    top tokens of each window."""

    def __init__(self, windows: Sequence[Window], zscore_window: int, keep_fraction: float):
        layer_counts = {w.diffs.shape[0] for w in windows if w.diffs.ndim == 2}
        if len(layer_counts) != 1 or any(w.diffs.ndim != 2 or w.oracle.shape != w.diffs.shape[1:] for w in windows):
            raise ValueError("windows must hold diffs [L, T] and oracle [T], with the same L in every window")
        self.num_layers = layer_counts.pop()
        L = self.num_layers
        self.bands = [tuple(range(lo, hi + 1)) for lo in range(L) for hi in range(lo, L)]
        self.row = {band: i for i, band in enumerate(self.bands)}
        z, top, self.spans = [], [], []
        start = 0
        for window in windows:
            judged = torch.isfinite(window.oracle).nonzero().flatten()
            if judged.numel() < 2:
                continue
            k = max(1, round(keep_fraction * judged.numel()))
            z.append(band_zscores(window.diffs, self.bands, zscore_window)[:, judged])
            is_top = torch.zeros(judged.numel(), dtype=torch.bool)
            is_top[window.oracle[judged].topk(k).indices] = True
            top.append(is_top)
            self.spans.append((start, start + judged.numel(), k))
            start += judged.numel()
        if not self.spans:
            raise ValueError("no window has judged tokens (a finite oracle): record more calibration text")
        self.z = torch.cat(z, dim=1)  # [bands, judged tokens]
        self.top = torch.cat(top)
        self.windows, self.judged_tokens = len(self.spans), start
        self.chance = sum(k * k / (end - begin) for begin, end, k in self.spans) / sum(k for *_, k in self.spans)

    def precision(self, terms: Terms) -> float:
        """The share of the candidate's top-``k`` judged tokens, per window, that is in the oracle's top ``k``."""
        score = sum(coefficient * self.z[self.row[band]] for band, coefficient in terms if coefficient != 0)
        hits = sum(int(self.top[begin:end][score[begin:end].topk(k).indices].sum()) for begin, end, k in self.spans)
        return hits / sum(k for *_, k in self.spans)

    def candidates(self, pairs: int) -> list[Terms]:
        """Every single band, signed as it correlates with the oracle's top, then the ``pairs`` disjoint pairs
        whose least-squares fit of that top indicator explains the most of its variance, each group best fit
        first; a pair's weights are its fitted coefficients (largest magnitude 1, two decimals)."""
        z = self.z.double()
        z = z - z.mean(dim=1, keepdim=True)
        y = self.top.double() - self.top.double().mean()
        covariance = z @ z.T / z.shape[1]
        with_top = z @ y / z.shape[1]
        variance = covariance.diagonal().clamp(min=1e-12)
        singles = [((self.bands[i], 1.0 if with_top[i] >= 0 else -1.0), ((), 0.0))
                   for i in (with_top**2 / variance).argsort(descending=True).tolist()]
        lo = torch.tensor([band[0] for band in self.bands])
        hi = torch.tensor([band[-1] for band in self.bands])
        x, o = torch.triu_indices(len(self.bands), len(self.bands), 1)
        disjoint = (hi[x] < lo[o]) | (hi[o] < lo[x])
        x, o = x[disjoint], o[disjoint]
        # The 2×2 normal equations of each pair, solved in closed form; the explained variance is w·cov(z, y).
        cxx, coo, cxo = variance[x], variance[o], covariance[x, o]
        determinant = cxx * coo - cxo**2
        wx = (coo * with_top[x] - cxo * with_top[o]) / determinant
        wo = (cxx * with_top[o] - cxo * with_top[x]) / determinant
        # Two bands that are nearly one signal have no stable pair of weights: leave such pairs out.
        explained = torch.where(determinant > 1e-6 * cxx * coo, wx * with_top[x] + wo * with_top[o], -math.inf)
        best_pairs = []
        for pair in explained.argsort(descending=True)[:pairs].tolist():
            scale = max(abs(float(wx[pair])), abs(float(wo[pair])))
            best_pairs.append((
                (self.bands[int(x[pair])], round(float(wx[pair]) / scale, 2)),
                (self.bands[int(o[pair])], round(float(wo[pair]) / scale, 2)),
            ))
        return singles + best_pairs


def future_reads(probabilities: torch.Tensor, value_norms: torch.Tensor, min_distance: int) -> torch.Tensor:
    """``[T]`` float64: for each key ``t``, the mean over heads ``h`` of
    ``‖v_h[t]‖ · Σ_{q >= t + min_distance} p_h[q, t]·(q + 1)``.

    ``probabilities [H, T queries, T keys]`` are one layer's attention probabilities, ``value_norms [H, T]``
    the norm of the value each head reads at each key. ``q + 1`` is the number of positions query ``q`` sees,
    so a uniform row counts 1 wherever it is; the value norm makes a read count by what it carries.
    """
    T = probabilities.shape[-1]
    rows = torch.arange(1, T + 1, dtype=torch.float32, device=probabilities.device)[:, None]
    reads = torch.tril(probabilities.float() * rows, diagonal=-min_distance).sum(dim=-2, dtype=torch.float64)
    return (reads * value_norms.double()).mean(dim=0)


def oracle_of_reads(reads: torch.Tensor, num_layers: int, min_distance: int) -> torch.Tensor:
    """``[T]`` float32 oracle of a window from its :func:`future_reads` summed over ``num_layers`` layers: the
    mean per layer and per query at least ``min_distance`` later. Judged (finite) for
    ``1 <= t <= T − 2·min_distance``, the tokens with at least ``min_distance`` such queries (the first
    token has no ``diff``)."""
    T = reads.shape[0]
    position = torch.arange(T, device=reads.device)
    oracle = reads / (num_layers * (T - min_distance - position).clamp(min=1))
    judged = (position >= 1) & (position <= T - 2 * min_distance)
    return torch.where(judged, oracle, math.nan).float()


def band_zscores(diffs: torch.Tensor, bands: Sequence[tuple[int, ...]], window: int) -> torch.Tensor:
    """``[len(bands), T]`` float32: the causal rolling z-score (window ``window``, ``ops.rolling_zscore``) of each
    band's mean of ``diffs [L, T]`` over its layers, each band its own stream, as the scorer computes it."""
    means = torch.stack([diffs[list(band)].float().mean(dim=0) for band in bands])
    count = len(bands)
    ring = torch.zeros(count, 1, window, dtype=torch.float32, device=diffs.device)
    pushed = torch.zeros(count, 1, dtype=torch.int64, device=diffs.device)
    return ops.rolling_zscore(means[:, None], ring, pushed, torch.ones(1, device=diffs.device))


def _reference_terms(method: str, num_layers: int) -> Terms | None:
    """The score of ``method``'s default bands and weights for this depth, ``None`` when its bands do not fit."""
    config = EpiKVConfig(method=method)
    try:
        band_a, band_b = config.resolve_bands(num_layers)
    except ValueError:
        return None
    return (band_a, config.weights[0]), (band_b, -config.weights[1])


def _bands_and_weights(terms: Terms) -> dict[str, tuple]:
    """``bands`` and ``weights`` of the config whose score is ``terms``: band A has the larger coefficient."""
    (band_a, c_a), (band_b, c_b) = sorted(terms, key=lambda term: term[1], reverse=True)
    band_a, band_b = (band if coefficient != 0 else () for band, coefficient in ((band_a, c_a), (band_b, c_b)))
    return {"bands": (band_a, band_b), "weights": (c_a, -c_b if c_b else 0.0)}


def _layers(band: tuple[int, ...]) -> str:
    if not band:
        return "none"
    return str(band[0]) if len(band) == 1 else f"{band[0]}–{band[-1]}"

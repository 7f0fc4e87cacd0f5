"""DeepConf's trace confidences (Fu et al., arXiv 2508.15260; facebookresearch/deepconf conventions).

Token confidence C_i = -(1/k) sum_{j<=k} log P_i(j) over the top-k log-probs of position i (k = 20),
computed by the engine from the raw logits (``sampling.token_confidence``). From the list of C_i:

- group confidence: the mean of C over a sliding window of ``window`` tokens (stride 1), default 2048;
  a trace shorter than the window has one group, the mean of all its C (``compute_least_grouped``);
- lowest-group confidence: the minimum group confidence (online mode's measure, ``min_conf``);
- bottom-p group confidence: the mean of the lowest max(1, int(p * #groups)) group confidences (p = 10%);
- tail confidence: the mean of C over the last ``tail`` tokens (2048);
- mean confidence: the mean of C over the whole trace.
An empty trace has confidence 0 (as the reference).
"""

from __future__ import annotations

import numpy as np

WINDOW = 2048


def group_confidences(confs, window: int = WINDOW) -> np.ndarray:
    """Means of every full window of ``window`` consecutive token confidences; [mean] when shorter."""
    c = np.asarray(confs, dtype=np.float64)
    if c.size == 0:
        return np.zeros(1)
    if c.size < window:
        return np.array([c.mean()])
    cs = np.concatenate([[0.0], np.cumsum(c)])
    return (cs[window:] - cs[:-window]) / window


def lowest_group_confidence(confs, window: int = WINDOW) -> float:
    return float(group_confidences(confs, window).min())


def bottom_percent_confidence(confs, window: int = WINDOW, bottom: float = 0.1) -> float:
    g = group_confidences(confs, window)
    k = max(1, int(len(g) * bottom))
    return float(np.partition(g, k - 1)[:k].mean())


def tail_confidence(confs, tail: int = WINDOW) -> float:
    c = np.asarray(confs, dtype=np.float64)
    return float(c[-tail:].mean()) if c.size else 0.0


def mean_confidence(confs) -> float:
    c = np.asarray(confs, dtype=np.float64)
    return float(c.mean()) if c.size else 0.0


class WindowStop:
    """Online early stop: feed token confidences one by one; ``push`` returns True at the first token where
    the window is full (``window`` tokens seen) and its mean is below ``threshold`` (strictly). A trace
    shorter than the window is never stopped (the reference's behaviour)."""

    def __init__(self, threshold: float, window: int = WINDOW):
        self.threshold, self.window = threshold, window
        self._buf: list[float] = []
        self._sum = 0.0

    def push(self, c: float) -> bool:
        self._buf.append(c)
        self._sum += c
        if len(self._buf) > self.window:
            self._sum -= self._buf[-1 - self.window]
        return len(self._buf) >= self.window and self._sum / self.window < self.threshold

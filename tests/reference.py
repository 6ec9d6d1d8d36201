"""Independent references for every loss, written from the formulas in float64 NumPy loops.

Each takes 2-D arrays ``[N, V]`` (positions × vocabulary) and returns per-position values;
nothing here calls potstill or torch.
"""

from __future__ import annotations

import math

import numpy as np


def softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / t
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    out = np.zeros(len(p))
    for n in range(len(p)):
        for i in range(p.shape[1]):
            if p[n, i] > 0:
                out[n] += p[n, i] * (math.log(p[n, i]) - math.log(q[n, i]))
    return out


def kl(s, t, temperature=1.0):
    return temperature**2 * kl_rows(softmax(t, temperature), softmax(s, temperature))


def reverse_kl(s, t, temperature=1.0):
    return temperature**2 * kl_rows(softmax(s, temperature), softmax(t, temperature))


def jsd(s, t, beta=0.5, temperature=1.0):
    """GKD's generalized JSD (Agarwal et al. 2024, eq. 1): β·KL(p_T‖M) + (1−β)·KL(p_S‖M),
    M = β·p_T + (1−β)·p_S; forward KL at β = 0 and reverse KL at β = 1 (the paper's ends, TRL's)."""
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    if beta == 0:
        return temperature**2 * kl_rows(p_t, p_s)
    if beta == 1:
        return temperature**2 * kl_rows(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return temperature**2 * (beta * kl_rows(p_t, m) + (1 - beta) * kl_rows(p_s, m))


def interpolated_jsd(s, t, beta=0.5, temperature=1.0):
    """(1−β)·KL(p_T‖M) + β·KL(p_S‖M) with the same M: continuous from forward to reverse KL."""
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    m = beta * p_t + (1 - beta) * p_s
    return temperature**2 * ((1 - beta) * kl_rows(p_t, m) + beta * kl_rows(p_s, m))


def skew_kl(s, t, skew=0.1, temperature=1.0):
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    return temperature**2 * kl_rows(p_t, skew * p_t + (1 - skew) * p_s)


def skew_reverse_kl(s, t, skew=0.1, temperature=1.0):
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    return temperature**2 * kl_rows(p_s, skew * p_s + (1 - skew) * p_t)


def tvd(s, t, temperature=1.0):
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    return np.array([0.5 * sum(abs(a - b) for a, b in zip(rt, rs, strict=True))
                     for rt, rs in zip(p_t, p_s, strict=True)])


def soft_cross_entropy(s, t, temperature=1.0):
    p_t, p_s = softmax(t, temperature), softmax(s, temperature)
    return temperature**2 * np.array([-sum(a * math.log(b) for a, b in zip(rt, rs, strict=True))
                                      for rt, rs in zip(p_t, p_s, strict=True)])


def mse(s, t):
    return np.array([np.mean([(a - b) ** 2 for a, b in zip(rs, rt, strict=True)])
                     for rs, rt in zip(s, t, strict=True)])


def cross_entropy(s, labels):
    p = softmax(s)
    return np.array([-math.log(p[n, y]) for n, y in enumerate(labels)])


def uld(s, t, temperature=1.0):
    p_s = -np.sort(-softmax(s, temperature), axis=-1)
    p_t = -np.sort(-softmax(t, temperature), axis=-1)
    size = max(p_s.shape[1], p_t.shape[1])
    out = []
    for rs, rt in zip(p_s, p_t, strict=True):
        rs = list(rs) + [0.0] * (size - len(rs))
        rt = list(rt) + [0.0] * (size - len(rt))
        out.append(sum(abs(a - b) for a, b in zip(rs, rt, strict=True)))
    return np.array(out)


def cosine(s, t):
    return np.array([1 - np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
                     for a, b in zip(s, t, strict=True)])


def attention(s, t, p=2.0):
    """s, t: [B, C, H, W]."""
    def amap(x):
        q = (np.abs(x) ** p).mean(axis=1).reshape(len(x), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)
    return ((amap(s) - amap(t)) ** 2).sum(axis=1)

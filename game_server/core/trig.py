"""Sine and cosine from + - * / only, so scalar and numpy code give bit-identical results on any CPU."""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

PI = math.pi
TWO_PI = 2.0 * math.pi
HALF_PI = 0.5 * math.pi

# Taylor coefficients 1/n! with alternating signs. On [-pi/2, pi/2] the first omitted terms are below
# 3e-16 (sine, x^21/21!) and 2e-17 (cosine, x^22/22!), so the result is within a few ulps of libm.
_S = tuple((-1.0) ** k / math.factorial(2 * k + 1) for k in range(1, 10))
_C = tuple((-1.0) ** k / math.factorial(2 * k) for k in range(1, 11))

F = TypeVar("F", float, np.ndarray)


def _sin_poly(t: F, t2: F) -> F:
    """sin(t) for |t| <= pi/2, Horner form; plain operators so floats and arrays round alike."""
    p = _S[7] + t2 * _S[8]
    for coef in (_S[6], _S[5], _S[4], _S[3], _S[2], _S[1], _S[0]):
        p = coef + t2 * p
    return t + t * (t2 * p)


def _cos_poly(t2: F) -> F:
    """cos(t) for |t| <= pi/2 from t*t."""
    p = _C[8] + t2 * _C[9]
    for coef in (_C[7], _C[6], _C[5], _C[4], _C[3], _C[2], _C[1], _C[0]):
        p = coef + t2 * p
    return 1.0 + t2 * p


def sincos(theta: float) -> tuple[float, float]:
    """(sin, cos) of an angle in [-pi, pi], folded onto [-pi/2, pi/2] (where cos changes sign)."""
    if theta > HALF_PI:
        t = PI - theta
        t2 = t * t
        return _sin_poly(t, t2), -_cos_poly(t2)
    if theta < -HALF_PI:
        t = -PI - theta
        t2 = t * t
        return _sin_poly(t, t2), -_cos_poly(t2)
    t2 = theta * theta
    return _sin_poly(theta, t2), _cos_poly(t2)


def sincos_array(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise `sincos`, bit-identical to it for every element."""
    theta = np.asarray(theta, dtype=np.float64)
    high = theta > HALF_PI
    low = theta < -HALF_PI
    t = np.where(high, PI - theta, np.where(low, -PI - theta, theta))
    t2 = t * t
    c = _cos_poly(t2)
    return _sin_poly(t, t2), np.where(high | low, -c, c)

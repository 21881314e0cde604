"""An independent mpmath oracle for every loss option, written from the definitions (not the reference's).

Each quantized input converts exactly to an ``mpf``. At ``PREC`` bits:

* t_k = C·tanh(z_k / C) (finite z) or z_k; lse = log Σ_k exp(t_k); log p_k = t_k − lse, directly;
* per row (class indices): (1 − ε) w_y (−log p_y) + (ε/C) Σ_k w_k (−log p_k); probabilities:
  −Σ_k w_k q̃_k log p_k with q̃ = (1 − ε) q + ε/C; terms with a zero coefficient are 0; + λ lse²;
* focal: α (1 − p_y)^γ (−log p_y) with p_y = exp(log p_y);
* binary: −[y log σ(z) + (1 − y) log(1 − σ(z))] with log σ(z) = −log1p(e^−z), log(1 − σ(z)) = −log1p(e^z);
* gradients by the chain rule on the definition: Σ_j coef_j (p_k − [j = k]) + 2 λ lse p_k, times
  1 − tanh²(z_k / C); focal through d f / d p_y, taken by mpmath.diff; binary σ(z) − y.

The precision (400 bits) resolves 1 − p_y and the cancellation lse − t_y for every case the tests build
(losses down to 1e-60 on logits up to 1e8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mpmath
import numpy as np
from mpmath import mpf

from ce_audit.dtypes import FloatFormat
from ce_audit.options import LossOptions

PREC = 400


def to_mpf(value: object) -> mpf:
    """The exact value of a NumPy float16/bfloat16/float32/float64 (or long double) scalar."""
    value = np.asarray(value)[()]
    if np.isnan(value):
        return mpmath.nan
    if np.isinf(value):
        return mpmath.inf if value > 0 else -mpmath.inf
    with mpmath.workprec(PREC):  # mpf(float) and + round to the context precision
        if isinstance(value, np.longdouble):
            mantissa, exponent = np.frexp(value)
            hi = np.float64(mantissa)
            lo = np.float64(mantissa - np.longdouble(hi))
            return mpmath.ldexp(mpf(float(hi)) + mpf(float(lo)), int(exponent))
        return mpf(float(value))


def ulp_mp(x: mpf, fmt: FloatFormat) -> mpf:
    """Spacing of ``fmt`` at |x| (subnormal spacing below 2^emin)."""
    if x == 0:
        exponent = fmt.emin
    else:
        _, e = mpmath.frexp(x)
        exponent = max(int(e) - 1, fmt.emin)
    return mpmath.ldexp(mpf(1), exponent - fmt.precision + 1)


def ulp_error(got: object, want: mpf, fmt: FloatFormat, scale: mpf | None = None) -> float:
    """|got − want| in ULPs of ``fmt`` at max(|want|, scale); 0 for matching NaN/inf, inf for a mismatch."""
    got_mp = to_mpf(got)
    if not mpmath.isfinite(want) or not mpmath.isfinite(got_mp):
        same = (mpmath.isnan(want) and mpmath.isnan(got_mp)) or got_mp == want
        return 0.0 if same else math.inf
    with mpmath.workprec(PREC):
        size = abs(want) if scale is None else max(abs(want), scale)
        return float(abs(got_mp - want) / ulp_mp(size, fmt))


@dataclass
class Oracle:
    value: list[mpf]  # the audited values: per row (none; binary: per element) or one
    grad: list[list[mpf]]
    per_row: list[mpf]
    grad_scale: list[list[mpf]]  # the largest term of each gradient entry (cancellation bound)


def _capped(z: mpf, cap: float) -> tuple[mpf, mpf]:
    if not cap:
        return z, mpf(1)
    if not mpmath.isfinite(z):  # a masked logit stays masked under a softcap: no gradient reaches it
        return z, mpf(0)
    c = mpf(cap)
    tanh = mpmath.tanh(z / c)
    return c * tanh, 1 - tanh * tanh


def softmax_oracle(
    logits: np.ndarray,
    targets: np.ndarray,
    options: LossOptions,
    weight: np.ndarray | None = None,
) -> Oracle:
    """Cross-entropy or focal loss with ``options``, from the definitions above."""
    n_rows, n_cols = logits.shape
    with mpmath.workprec(PREC):
        w = [mpf(1)] * n_cols if weight is None else [to_mpf(x) for x in weight]
        eps = mpf(options.label_smoothing)
        n_classes = mpf(n_cols)
        lam = mpf(options.z_loss)
        rows_out: list[mpf] = []
        grads: list[list[mpf]] = []
        scales: list[list[mpf]] = []
        valid_rows: list[bool] = []
        weight_total = mpf(0)
        z_terms: list[mpf] = []
        for i in range(n_rows):
            capped = [_capped(to_mpf(v), options.softcap) for v in logits[i]]
            t = [c[0] for c in capped]
            dt = [c[1] for c in capped]
            finite = [x for x in t if mpmath.isfinite(x)]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in finite))
            logp = [x - lse if mpmath.isfinite(x) else -mpmath.inf for x in t]
            p = [mpmath.exp(x) if mpmath.isfinite(x) else mpf(0) for x in logp]
            if options.probs:
                valid = True
                q = [to_mpf(x) for x in targets[i]]
                coef = [w[k] * ((1 - eps) * q[k] + eps / n_classes) for k in range(n_cols)]
            else:
                y = int(targets[i])
                valid = y != options.ignore_index
                coef = [eps / n_classes * w[k] for k in range(n_cols)]
                if valid:
                    coef[y] += (1 - eps) * w[y]
                    weight_total += w[y]
            valid_rows.append(valid)
            if not valid:
                rows_out.append(mpf(0))
                grads.append([mpf(0)] * n_cols)
                scales.append([mpf(0)] * n_cols)
                z_terms.append(mpf(0))
                continue
            if options.family == "focal":
                gamma, alpha = mpf(options.focal_gamma), mpf(options.focal_alpha)
                p_y = p[y]

                loss = alpha * (1 - p_y) ** gamma * -mpmath.log(p_y)
                # d/dp [α (1 − p)^γ (−log p)] = −α γ (1 − p)^(γ−1) (−log p) − α (1 − p)^γ / p
                slope = mpf(0)
                if p_y < 1:
                    slope = (
                        -alpha * gamma * (1 - p_y) ** (gamma - 1) * -mpmath.log(p_y)
                        - alpha * (1 - p_y) ** gamma / p_y
                    )
                g = [slope * p_y * ((1 if k == y else 0) - p[k]) for k in range(n_cols)]
                scale = [abs(x) for x in g]
            else:
                loss = mpmath.fsum(c * -lp for c, lp in zip(coef, logp, strict=True) if c != 0)
                total = mpmath.fsum(coef)
                g = [total * p[k] - coef[k] for k in range(n_cols)]
                scale = [max(abs(total * p[k]), abs(coef[k])) for k in range(n_cols)]
            z_term = lam * lse * lse if options.z_loss else mpf(0)
            z_terms.append(z_term)
            if options.z_loss:
                g = [g[k] + 2 * lam * lse * p[k] for k in range(n_cols)]
                scale = [scale[k] + abs(2 * lam * lse * p[k]) for k in range(n_cols)]
            g = [g[k] * dt[k] for k in range(n_cols)]
            scale = [scale[k] * dt[k] for k in range(n_cols)]
            rows_out.append(loss + z_term)
            grads.append(g)
            scales.append(scale)
        n_valid = sum(valid_rows)
        if options.reduction == "none":
            return Oracle(rows_out, grads, rows_out, scales)
        if options.reduction == "sum":
            return Oracle([mpmath.fsum(rows_out)], grads, rows_out, scales)
        if options.probs:
            denominator = mpf(n_rows)
        elif options.family == "focal" or weight is None:
            denominator = mpf(n_valid)
        else:
            denominator = weight_total
        ce_sum = mpmath.fsum(r - z for r, z in zip(rows_out, z_terms, strict=True))
        if denominator == 0:
            value = mpmath.nan
            grads = [[mpmath.nan if v else mpf(0) for _ in g] for g, v in zip(grads, valid_rows, strict=True)]
            return Oracle([value], grads, rows_out, scales)
        value = ce_sum / denominator
        if options.z_loss:
            value += mpmath.fsum(z_terms) / n_valid
        z_scale = 1 / mpf(n_valid) if n_valid else mpf(0)
        out_grads, out_scales = [], []
        for i in range(n_rows):
            if not valid_rows[i]:
                out_grads.append(grads[i])
                out_scales.append(scales[i])
                continue
            capped = [_capped(to_mpf(v), options.softcap) for v in logits[i]]
            t = [c[0] for c in capped]
            finite = [x for x in t if mpmath.isfinite(x)]
            lse = mpmath.log(mpmath.fsum(mpmath.exp(x) for x in finite))
            zg = [
                2 * lam * lse * mpmath.exp(t[k] - lse) * capped[k][1] if mpmath.isfinite(t[k]) else mpf(0)
                for k in range(n_cols)
            ]
            out_grads.append(
                [(g - zk) / denominator + zk * z_scale for g, zk in zip(grads[i], zg, strict=True)]
            )
            out_scales.append(
                [s / denominator + abs(zk) * z_scale for s, zk in zip(scales[i], zg, strict=True)]
            )
        return Oracle([value], out_grads, rows_out, out_scales)


def binary_oracle(
    logits: np.ndarray, targets: np.ndarray, options: LossOptions, weight: np.ndarray | None = None
) -> Oracle:
    """Elementwise −[y log σ(z) + (1 − y) log(1 − σ(z))] · w and its gradient (σ(z) − y) · w."""
    n_rows, n_cols = logits.shape
    with mpmath.workprec(PREC):
        w = [mpf(1)] * n_cols if weight is None else [to_mpf(x) for x in weight]
        losses, grads, scales = [], [], []
        for i in range(n_rows):
            g_row, s_row = [], []
            for k in range(n_cols):
                z, y = to_mpf(logits[i, k]), to_mpf(targets[i, k])
                # σ(z) and 1 − σ(z) = e^−z σ(z): mpf exponents are unbounded, so no value rounds to 0 or 1
                sig = 1 / (1 + mpmath.exp(-z))
                one_minus = mpmath.exp(-z) * sig
                loss = mpf(0)
                if y != 0:  # log σ(z) = −log(1 + e^−z), log(1 − σ(z)) = log σ(−z) = −log(1 + e^z), via log1p
                    loss += y * mpmath.log1p(mpmath.exp(-z))
                if y != 1:
                    loss += (1 - y) * mpmath.log1p(mpmath.exp(z))
                losses.append(loss * w[k])
                g_row.append((sig - y if y != 1 else -one_minus) * w[k])
                s_row.append(max(abs(sig * (1 - y)), abs(y * one_minus)) * w[k])
            grads.append(g_row)
            scales.append(s_row)
        if options.reduction == "none":
            return Oracle(losses, grads, losses, scales)
        total = mpmath.fsum(losses)
        if options.reduction == "sum":
            return Oracle([total], grads, losses, scales)
        count = mpf(n_rows * n_cols)
        if count == 0:
            return Oracle([mpmath.nan], grads, losses, scales)
        return Oracle(
            [total / count],
            [[g / count for g in r] for r in grads],
            losses,
            [[s / count for s in r] for r in scales],
        )

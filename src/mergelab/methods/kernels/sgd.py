"""The compiled passes of flat.py: the outer SGD step and the pseudo-gradient (numba; imported only
when numba is installed)."""

from __future__ import annotations

import numba
from numba.extending import intrinsic


@intrinsic
def fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma): what torch's vectorised add-with-alpha computes."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return a(a, a, a), codegen


@numba.njit(cache=True, boundscheck=False)
def sgd_pass(s, m, theta, out, count, lr, mu, damp1, wd, nesterov, maximize, first):
    """One pass of torch.optim.SGD's update (see flat.py) with gradient s / count; writes m, theta, out."""
    for i in range(s.shape[0]):
        g = s[i] / count
        if maximize:
            g = -g
        if wd != 0:
            g = fma(wd, theta[i], g)  # grad.add(param, alpha=wd)
        if mu != 0:
            if first:
                b = g  # buf = grad.clone()
            else:
                b = fma(damp1, g, m[i] * mu)  # buf.mul_(mu).add_(grad, alpha=1 - dampening)
            m[i] = b
            u = fma(mu, b, g) if nesterov else b  # grad.add(buf, alpha=mu), or buf
        else:
            u = g
        t = fma(-lr, u, theta[i])  # param.add_(grad, alpha=-lr)
        theta[i] = t
        out[i] = t


@numba.njit(cache=True, boundscheck=False)
def sub_finite(a, b, out):
    """out <- a - b; True if every value of out is finite (x * 0 is NaN exactly for NaN and +-Inf)."""
    acc = 0.0
    for i in range(a.shape[0]):
        d = a[i] - b[i]
        out[i] = d
        acc += d * 0
    return acc == 0

"""The Triton kernels themselves. Imported lazily, at the first Triton launch.

``triton.jit`` reads ``TRITON_INTERPRET`` when this module is imported: set it
before the first use of a ``backend="triton"`` kernel to run them on CPU tensors.
Every kernel has a pure-torch twin (``*_reference`` in the public modules) that is
both the CPU fallback and the test oracle.
"""

from __future__ import annotations

import triton
import triton.language as tl


# -- logistic regression: H v = (1/n) Xᵀ (σ'(Xw) ⊙ Xv) -----------------------------------------
@triton.jit
def logistic_hvp_kernel(X, w, v, curv, part, n, d, sxn, sxd, inv_n, row_blocks,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, HAS_CURV: tl.constexpr):
    """Program ``pid`` owns row blocks pid, pid+G, ...; it reads each block of X twice (the
    second read hits cache) and accumulates its share of Xᵀ(d ⊙ Xv) in ``part[pid, :]``.
    With ``HAS_CURV`` the row curvatures ``d = σ'(Xw)`` come precomputed in ``curv``."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols0 = tl.arange(0, BLOCK_D)
    for rb in range(pid, row_blocks, G):
        rows = rb * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n
        z = tl.zeros([BLOCK_N], dtype=ACC)
        u = tl.zeros([BLOCK_N], dtype=ACC)
        for k in range(0, d, BLOCK_D):
            cols = k + cols0
            cmask = cols < d
            x = tl.load(X + rows[:, None] * sxn + cols[None, :] * sxd, mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(ACC)
            vk = tl.load(v + cols, mask=cmask, other=0.0).to(ACC)
            u += tl.sum(x * vk[None, :], axis=1)
            if not HAS_CURV:
                wk = tl.load(w + cols, mask=cmask, other=0.0).to(ACC)
                z += tl.sum(x * wk[None, :], axis=1)
        if HAS_CURV:
            dd = tl.load(curv + rows, mask=rmask, other=0.0).to(ACC)
        else:
            s = 1.0 / (1.0 + tl.exp(-z))
            dd = s * (1.0 - s)
        coef = tl.where(rmask, dd * u * inv_n, 0.0)
        for k in range(0, d, BLOCK_D):
            cols = k + cols0
            cmask = cols < d
            x = tl.load(X + rows[:, None] * sxn + cols[None, :] * sxd, mask=rmask[:, None] & cmask[None, :],
                        other=0.0).to(ACC)
            contrib = tl.sum(x * coef[:, None], axis=0)
            prev = tl.load(part + pid * d + cols, mask=cmask, other=0.0)
            tl.store(part + pid * d + cols, prev + contrib, mask=cmask)


# -- softmax cross-entropy head: S = P ⊙ U − P · rowsum(P ⊙ U), in place over Z --------------------
@triton.jit
def ce_hvp_rows_kernel(Z, U, szr, sur, C, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """One program per row: P = softmax(Z_row); writes S_row = P ⊙ (U_row − <P, U_row>) over Z_row."""
    row = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_C)
    m = tl.full([BLOCK_C], -float("inf"), dtype=ACC)
    l = tl.zeros([BLOCK_C], dtype=ACC)
    a = tl.zeros([BLOCK_C], dtype=ACC)
    # pass 1: online softmax statistics per lane, and Σ exp(z − m) u
    for k in range(0, C, BLOCK_C):
        cols = k + cols0
        cmask = cols < C
        z = tl.load(Z + row * szr + cols, mask=cmask, other=-float("inf")).to(ACC)
        uu = tl.load(U + row * sur + cols, mask=cmask, other=0.0).to(ACC)
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)    # no (−inf) − (−inf) = NaN
        scale = tl.exp(m - m_safe)                                # exp(−inf) = 0 for an empty lane
        e = tl.exp(z - m_safe)                                    # masked lanes: z = −inf → 0
        l = l * scale + e
        a = a * scale + e * uu
        m = m_new
    m_row = tl.max(m, axis=0)
    lane = tl.exp(m - m_row)                                      # empty lanes: exp(−inf) = 0
    l_row = tl.sum(l * lane, axis=0)
    pu = tl.sum(a * lane, axis=0) / l_row          # <P, U_row>
    # pass 2: S = P ⊙ (U − <P, U>)
    for k in range(0, C, BLOCK_C):
        cols = k + cols0
        cmask = cols < C
        z = tl.load(Z + row * szr + cols, mask=cmask, other=-float("inf")).to(ACC)
        uu = tl.load(U + row * sur + cols, mask=cmask, other=0.0).to(ACC)
        p = tl.exp(z - m_row) / l_row
        tl.store(Z + row * szr + cols, p * (uu - pu), mask=cmask)


# -- per-weight decay: the mixed product  decay'(λ) ⊙ w ⊙ u  (e^λ ⊙ w ⊙ u for decay = e^λ) -----------
@triton.jit
def decay_mixed_kernel(lam, w, u, out, N, SOFTPLUS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = tl.load(lam + offs, mask=mask, other=0.0).to(ACC)
    if SOFTPLUS:
        dd = 1.0 / (1.0 + tl.exp(-r))                  # d softplus(r) / dr = σ(r)
    else:
        dd = tl.exp(r)
    ww = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
    uu = tl.load(u + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out + offs, dd * ww * uu, mask=mask)


# -- solver vector updates on flat buffers ---------------------------------------------------------
# Persistent grids: G programs, program ``pid`` owns blocks pid, pid+G, ... and writes one partial
# per reduction (deterministic; no atomics). Consumers sum the G partials on device.
@triton.jit
def partial_dot_kernel(a, b, part, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """part[pid] = Σ a ⊙ b over the program's blocks."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(pid * BLOCK, N, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        acc += tl.load(a + offs, mask=mask, other=0.0).to(ACC) * tl.load(b + offs, mask=mask, other=0.0).to(ACC)
    tl.store(part + pid, tl.sum(acc, axis=0))


@triton.jit
def cg_update_kernel(x, r, p, s, w, gin, gout, dpart, sin, sout, N, BLOCK: tl.constexpr,
                     G_BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One fused Chronopoulos–Gear CG iteration, with no host sync (``cg_update_reference`` in torch).

    ``w = A r`` was just computed; ``gin`` holds the per-program partials of γ = <r, r> (from
    the previous launch) and ``dpart`` those of δ = <w, r>. Every program sums them itself and
    forms β = γ/γ_prev and the curvature κ = δ − βγ/α_prev = <p, A p> (first iteration: β = 0,
    κ = δ), its Rayleigh quotient ρ = κ/‖p‖² and α = γ/κ; then updates its blocks
    ``p = r + βp; s = w + βs; x += αp; r −= αs`` and writes its partial of the new γ to ``gout``.
    ``sin`` / ``sout``: the state (``CG_STATE_FIELDS``) before / after (program 0 writes ``sout``).
    ρ < −flat_tol·scale (or NaN) sets status 1, |ρ| ≤ flat_tol·scale status 2 (scale: the largest
    |ρ| so far); once the status is set, or γ ≤ thresh, α = β = 0 and x, r no longer move.
    """
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    gi = tl.arange(0, G_BLOCK)
    gm = gi < G
    gamma = tl.sum(tl.load(gin + gi, mask=gm, other=0.0), axis=0)
    delta = tl.sum(tl.load(dpart + gi, mask=gm, other=0.0), axis=0)
    gamma_prev = tl.load(sin + 0)
    alpha_prev = tl.load(sin + 1)
    first = tl.load(sin + 2) > 0
    status = tl.load(sin + 3)
    pnorm2_prev = tl.load(sin + 5)
    scale_prev = tl.load(sin + 6)
    thresh = tl.load(sin + 8)
    flat_tol = tl.load(sin + 9)
    beta = tl.where(first, 0.0, gamma / tl.where(gamma_prev > 0, gamma_prev, 1.0))
    kappa = tl.where(first, delta, delta - beta * gamma / tl.where(alpha_prev != 0, alpha_prev, 1.0))
    pnorm2 = gamma + beta * beta * pnorm2_prev            # ‖p‖² = ‖r‖² + β²‖p_prev‖² (r ⊥ p_prev)
    rq = kappa / tl.where(pnorm2 > 0, pnorm2, 1.0)
    active = (status == 0) & (gamma > thresh)
    rq_abs = tl.abs(rq)
    scale = tl.where(rq_abs > scale_prev, rq_abs, scale_prev)   # NaN keeps scale_prev (fmax)
    negative = ~(rq >= -flat_tol * scale)                 # NaN too
    flat = rq_abs <= flat_tol * scale
    ok = active & ~negative & ~flat
    alpha = tl.where(ok, gamma / tl.where(ok, kappa, 1.0), 0.0)
    beta = tl.where(ok, beta, 0.0)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(pid * BLOCK, N, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        rr = tl.load(r + offs, mask=mask, other=0.0).to(ACC)
        ww = tl.load(w + offs, mask=mask, other=0.0).to(ACC)
        pp = rr + beta * tl.load(p + offs, mask=mask, other=0.0).to(ACC)
        ss = ww + beta * tl.load(s + offs, mask=mask, other=0.0).to(ACC)
        xx = tl.load(x + offs, mask=mask, other=0.0).to(ACC) + alpha * pp
        rr = rr - alpha * ss
        tl.store(p + offs, pp, mask=mask)
        tl.store(s + offs, ss, mask=mask)
        tl.store(x + offs, xx, mask=mask)
        tl.store(r + offs, rr, mask=mask)
        acc += rr * rr
    tl.store(gout + pid, tl.sum(acc, axis=0))
    if pid == 0:
        rq_seen = tl.where(rq == rq, rq, -float("inf"))     # NaN curvature counts as -inf
        min_prev = tl.load(sin + 4)
        tl.store(sout + 0, tl.where(ok, gamma, gamma_prev))
        tl.store(sout + 1, tl.where(ok, alpha, alpha_prev))
        tl.store(sout + 2, tl.where(ok, 0.0, tl.load(sin + 2)))
        tl.store(sout + 3, tl.where(active & negative, 1.0, tl.where(active & flat, 2.0, status)))
        tl.store(sout + 4, tl.where(active, tl.where(rq_seen < min_prev, rq_seen, min_prev), min_prev))
        tl.store(sout + 5, tl.where(ok, pnorm2, pnorm2_prev))
        tl.store(sout + 6, scale)
        tl.store(sout + 7, tl.load(sin + 7) + tl.where(ok, 1.0, 0.0))
        tl.store(sout + 8, thresh)
        tl.store(sout + 9, flat_tol)


@triton.jit
def neumann_update_kernel(v, av, acc, part, alpha, N, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """One fused Neumann step: ``v ← v − α A v``; ``acc ← acc + v``; ``part[pid] = ‖v‖²`` over its blocks."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    a = tl.load(alpha).to(ACC)
    sq = tl.zeros([BLOCK], dtype=ACC)
    for start in range(pid * BLOCK, N, G * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < N
        vv = tl.load(v + offs, mask=mask, other=0.0).to(ACC) - a * tl.load(av + offs, mask=mask, other=0.0).to(ACC)
        tl.store(v + offs, vv, mask=mask)
        tl.store(acc + offs, tl.load(acc + offs, mask=mask, other=0.0).to(ACC) + vv, mask=mask)
        sq += vv * vv
    tl.store(part + pid, tl.sum(sq, axis=0))

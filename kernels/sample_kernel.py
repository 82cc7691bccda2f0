"""The fused proxy-tuning sampler as Triton jit functions (pointers, strides, constexpr flags only).

One launch per decoding step, grid ``(B, S)``: program ``(r, p)`` reads slice ``p`` of row ``r`` of the base,
every expert and every anti-expert once, combines them in fp32 (the reference's order), and keeps an online
max / arg-max / sum of ``exp(z)`` plus a *candidate set*: the tokens that can matter for the draw, appended
to a per-row scratch list through an atomic counter. The last program of a row to arrive (atomic arrival
counter, no spin barrier) merges the partials and finishes the row on the candidates, or, when the list
overflowed, by an exact multi-pass fallback over the row. The counters must be zero when a launch starts:
the launcher (:mod:`proxytune.kernels.launch`) zeroes them on the same stream just before it (a memset that
a CUDA graph captures with the kernel). The exact semantics are ``docs/semantics.md``; why the candidate set
is exact is argued at :func:`_candidate_theta`.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Gumbel noise range: u in [2^-24, 1 - 2^-24] gives g in [-2.8116, 16.6355]. A token with z < -19.45 can
# therefore never beat the first maximum (z = 0, always kept) in the Gumbel-max draw.
DRAW_GAP = tl.constexpr(19.45)
# exp(-17.33) = 2^-25: tokens more than ln(V) + 17.33 nats below the maximum carry, all together, less than
# 2^-25 of the maximum's mass: below fp32 rounding of any sum that contains the maximum.
TAIL_GAP = tl.constexpr(17.33)
MARGIN_FINISH = tl.constexpr(1.0)  # nats of slack on every bound used by the finishing program
MARGIN_COLLECT = tl.constexpr(2.0)  # programs collect one nat more than the finisher needs: covers rounding of running values
KLEVEL_STEP = tl.constexpr(1.0)  # nats between the top-k lower-bound levels each program counts
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
BIG_INDEX = tl.constexpr(2147483647)
NP = tl.constexpr(16)  # pivots per pass of the fallback search: 2^32 keys in 8 passes (17-way)
SEARCH_STEPS = tl.constexpr(9)


@triton.jit
def _combined_block(
    base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row, a3_row,
    w0, w1, w2, w3, cols, mask, N_PAIRS: tl.constexpr,
):  # fmt: skip
    """``s = base + sum_i w_i * (e_i - a_i)`` in fp32, pairs added in order; non-finite or masked -> -inf."""
    s = tl.load(base_row + cols, mask=mask, other=0.0).to(tl.float32)
    if N_PAIRS > 0:
        s = s + w0 * (tl.load(e0_row + cols, mask=mask, other=0.0).to(tl.float32) - tl.load(a0_row + cols, mask=mask, other=0.0).to(tl.float32))
    if N_PAIRS > 1:
        s = s + w1 * (tl.load(e1_row + cols, mask=mask, other=0.0).to(tl.float32) - tl.load(a1_row + cols, mask=mask, other=0.0).to(tl.float32))
    if N_PAIRS > 2:
        s = s + w2 * (tl.load(e2_row + cols, mask=mask, other=0.0).to(tl.float32) - tl.load(a2_row + cols, mask=mask, other=0.0).to(tl.float32))
    if N_PAIRS > 3:
        s = s + w3 * (tl.load(e3_row + cols, mask=mask, other=0.0).to(tl.float32) - tl.load(a3_row + cols, mask=mask, other=0.0).to(tl.float32))
    return tl.where(mask & (tl.abs(s) < POS_INF), s, NEG_INF)  # NaN fails the comparison too


@triton.jit
def _scaled(s, m, temperature):
    """``z = (s - m) / T`` exactly as the reference (one subtraction, one IEEE division); masked -> -inf,
    and so is a NaN (``-inf / inf``: an overflowed difference at ``T = +inf``), as the reference's
    ``isfinite(z)`` masks it. Adding +0.0 turns a -0.0 into +0.0 so that order keys of equal values are equal."""
    z = (s - m) / temperature
    z = tl.where((s > NEG_INF) & (z == z), z, NEG_INF)
    return z + 0.0


@triton.jit
def _over_t(d, temperature, inv_t):
    """``d / T`` for differences ``d = s - m <= 0`` in the running sums and candidate tests (NaN -> -inf).

    A product with ``inv_t = 1 / T`` where that is finite (a few ulps from the division, which the margins
    cover). When ``1 / T`` overflows fp32 (``T < 2^-128``, about 2.9e-39) the product would give
    ``0 * inf = NaN`` at the maximum and lose every finite z of a subnormal-scale row, so it divides, as the
    reference does. ``T`` is one value per row: the branch is uniform."""
    if inv_t < POS_INF:
        q = d * inv_t
    else:
        q = d / temperature
    return tl.where(q == q, q, NEG_INF)


@triton.jit
def _order_key(z):
    """An int32 whose signed order is the float order of ``z`` (no NaN)."""
    bits = z.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _gumbel(seed, step_lo, step_hi, cols):
    """Gumbel noise for tokens ``cols``: Philox-4x32-10 first word, 23 bits, ``-log(-log(u))`` (noise.py)."""
    c0 = cols.to(tl.uint32)
    zero = tl.zeros_like(c0)
    r0, _, _, _ = tl.philox(seed, c0, zero, zero + step_lo, zero + step_hi)
    u = ((r0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2^-23
    return -tl.log(-tl.log(u))


@triton.jit
def _candidate_theta(log_z, k_on, p_on, minp_on, top_p, min_p, log_v, use_sum):
    """The candidate bound in z units: every token that can matter has ``z >= theta`` (before margins).

    Exactness (z = (s - m) / T, max z = 0, Z = sum exp(z) >= 1, K = top-k survivors, K* = final set):

    * top-p without top-k (``use_sum``): a token j with ``z_j < ln Z - ln(V / (1 - p))`` has all tokens at
      or below it carrying at most ``V exp(z_j) / Z < 1 - p`` of the mass, so the mass strictly above it
      exceeds p: top-p drops it. ``ln Z`` is computed from running values, which only under-estimate it.
    * min-p: ``z_j < ln(min_p)`` fails ``exp(z_j) >= min_p``.
    * top-k (0 < k < V): candidates are also cut at a per-program level below which the program alone has
      seen k tokens (so below t_k). Top-p needs Z_K, the sum over K, so the z bound is the negligible-tail
      one, ``-(ln V + 17.33)`` (the tokens below it hold < 2^-25 of Z_K), unless top-p is off and min-p
      is on (then min-p's bound suffices: K* = K with z >= ln min_p). If at least k closed candidates
      remain, t_k is among them; if fewer, every one of them is in K and the rest of K is negligible.
    * nothing on: K* = every finite token, Z* = Z from the online sum, and the draw needs only the tokens
      within DRAW_GAP of the maximum.
    NaN or non-positive top_p / NaN min_p keep only ties at the maximum: bound 0.
    """
    theta_minp = tl.where(min_p > 0, tl.minimum(tl.log(tl.maximum(min_p, 1e-38)), 0.0), 0.0)
    one_minus_p = tl.maximum(1.0 - top_p, 1e-30)
    theta_p = tl.where(top_p > 0, log_z - (log_v - tl.log(one_minus_p)), 0.0)
    theta_tail = -(log_v + TAIL_GAP)
    theta_k = tl.where((p_on == 0) & minp_on, theta_minp, theta_tail)
    theta_nok = tl.where(p_on & use_sum, theta_p, NEG_INF)
    theta_nok = tl.maximum(theta_nok, tl.where(minp_on, theta_minp, NEG_INF))
    theta_nok = tl.where(p_on | minp_on, theta_nok, -DRAW_GAP)
    return tl.where(k_on, theta_k, theta_nok)


@triton.jit
def _fallback_pass(
    mode, pivots, tk_key, cut_key, m, temperature, min_p, first_max, seed, step_lo, step_hi, V,
    base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row, a3_row, w0, w1, w2, w3,
    USE_P: tl.constexpr, N_PAIRS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """One pass over the whole row (the exact fallback), for NP pivots (order keys) at once.

    ``mode`` 0: per pivot, the number of finite tokens with key >= pivot. 1: per pivot, the sum of exp(z)
    over finite tokens with key >= tk_key and key > pivot. 2: the draw over the final keep set. Returns
    (counts [NP], sums [NP], token, z of token, sum of exp(z) over the keep set)."""
    count = tl.zeros((NP,), tl.int32)
    total = tl.zeros((NP,), tl.float32)
    kept_sum = tl.zeros((BLOCK,), tl.float32)
    best = tl.full((), NEG_INF, tl.float32)
    token = tl.full((), 0, tl.int32)
    z_token = tl.full((), NEG_INF, tl.float32)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        s = _combined_block(base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row, a3_row,
                            w0, w1, w2, w3, cols, mask, N_PAIRS)  # fmt: skip
        z = _scaled(s, m, temperature)
        key = _order_key(z)
        finite = z > NEG_INF
        if mode == 0:
            hit = finite[:, None] & (key[:, None] >= pivots[None, :])
            count += tl.sum(hit.to(tl.int32), axis=0)
        elif mode == 1:
            hit = (finite & (key >= tk_key))[:, None] & (key[:, None] > pivots[None, :])
            total += tl.sum(tl.where(hit, tl.exp(z)[:, None], 0.0), axis=0)
        else:
            keep = finite & (key >= tk_key)
            if USE_P:
                keep = keep & (key >= cut_key)
            keep = (keep & (tl.exp(z) >= min_p)) | (finite & (cols == first_max))
            kept_sum += tl.where(keep, tl.exp(z), 0.0)
            g = _gumbel(seed, step_lo, step_hi, cols)
            draw = tl.where(keep, z + g, NEG_INF)
            b = tl.max(draw, axis=0)
            t = tl.min(tl.where(keep & (draw == b), cols, BIG_INDEX), axis=0)
            better = b > best
            z_t = tl.max(tl.where(cols == t, z, NEG_INF), axis=0)
            token = tl.where(better, t, token)
            z_token = tl.where(better, z_t, z_token)
            best = tl.maximum(best, b)
    return count, total, token, z_token, tl.sum(kept_sum, axis=0)


@triton.jit
def proxy_sample_kernel(
    base_ptr, base_rs,
    e0_ptr, e0_rs, a0_ptr, a0_rs, e1_ptr, e1_rs, a1_ptr, a1_rs,
    e2_ptr, e2_rs, a2_ptr, a2_rs, e3_ptr, e3_rs, a3_ptr, a3_rs,
    w_ptr, w_sp, w_sb,
    temp_ptr, temp_s, topk_ptr, topk_s, topp_ptr, topp_s, minp_ptr, minp_s, seed_ptr, seed_s, step_ptr, step_s,
    token_ptr, logprob_ptr,
    part_f_ptr, part_i_ptr, cand_s_ptr, cand_i_ptr, counter_ptr,
    V, SLICE, log_v,
    N_PAIRS: tl.constexpr, BLOCK: tl.constexpr, CAP: tl.constexpr, S_POW2: tl.constexpr, NB: tl.constexpr,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, HAS_MINP: tl.constexpr, WRITE_LOGPROBS: tl.constexpr,
):  # fmt: skip
    """Grid (B, S). Scratch: ``part_f`` fp32 [B, S, 3] (max, sum of exp, top-k level), ``part_i`` int32 [B, S]
    (first arg-max), ``cand_s`` fp32 / ``cand_i`` int32 [B, CAP], ``counter`` int32 [B, 2] (candidates,
    arrivals; zero at the start of the launch: the launcher zeroes them)."""
    row = tl.program_id(0)
    pid = tl.program_id(1)
    n_split = tl.num_programs(1)
    row64 = row.to(tl.int64)

    base_row = base_ptr + row64 * base_rs
    e0_row = e0_ptr + row64 * e0_rs
    a0_row = a0_ptr + row64 * a0_rs
    e1_row = e1_ptr + row64 * e1_rs
    a1_row = a1_ptr + row64 * a1_rs
    e2_row = e2_ptr + row64 * e2_rs
    a2_row = a2_ptr + row64 * a2_rs
    e3_row = e3_ptr + row64 * e3_rs
    a3_row = a3_ptr + row64 * a3_rs
    w0 = 0.0
    w1 = 0.0
    w2 = 0.0
    w3 = 0.0
    if N_PAIRS > 0:
        w0 = tl.load(w_ptr + row64 * w_sb)
    if N_PAIRS > 1:
        w1 = tl.load(w_ptr + w_sp + row64 * w_sb)
    if N_PAIRS > 2:
        w2 = tl.load(w_ptr + 2 * w_sp + row64 * w_sb)
    if N_PAIRS > 3:
        w3 = tl.load(w_ptr + 3 * w_sp + row64 * w_sb)

    temperature = tl.load(temp_ptr + row64 * temp_s)
    sampled = temperature > 0  # NaN and T <= 0 are greedy
    temp_safe = tl.where(sampled, temperature, 1.0)
    inv_t = 1.0 / temp_safe
    top_k = tl.load(topk_ptr + row64 * topk_s)
    top_p = tl.load(topp_ptr + row64 * topp_s)
    min_p = tl.load(minp_ptr + row64 * minp_s)
    # Per-row switches; the constexpr flags let a caller compile a filter out entirely.
    k_on = (top_k > 0) & (top_k < V) & HAS_TOPK  # k >= V keeps every finite token: the same as off
    p_on = ((top_p < 1) | (top_p != top_p)) & HAS_TOPP  # NaN top_p is on (keeps the maximum's ties)
    minp_on = ((min_p > 0) | (min_p != min_p)) & HAS_MINP  # NaN min_p is on (keeps the first maximum)
    levels_step = tl.arange(0, NB).to(tl.float32) * (KLEVEL_STEP * temp_safe)

    # ---- pass 1: this program's slice, read once ------------------------------------------------------
    start = pid * SLICE
    end = tl.minimum(start + SLICE, V)
    m_run = tl.full((), NEG_INF, tl.float32)
    z_sum = tl.full((), 0.0, tl.float32)  # sum exp((s - m_run) / T)
    arg = start
    anchor = tl.full((), NEG_INF, tl.float32)
    counts = tl.zeros((NB,), tl.int32)
    k_level = tl.full((), NEG_INF, tl.float32)
    for off in range(start, end, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < end
        s = _combined_block(base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row, a3_row,
                            w0, w1, w2, w3, cols, mask, N_PAIRS)  # fmt: skip
        b_max = tl.max(s, axis=0)
        b_arg = tl.min(tl.where(s == b_max, cols, BIG_INDEX), axis=0)
        arg = tl.where(b_max > m_run, b_arg, arg)
        m_new = tl.maximum(m_run, b_max)
        if sampled & (m_new > NEG_INF):
            z = tl.where(s > NEG_INF, _over_t(s - m_new, temp_safe, inv_t), NEG_INF)
            rescale = tl.where(m_run > NEG_INF, tl.exp(_over_t(m_run - m_new, temp_safe, inv_t)), 0.0)
            z_sum = z_sum * rescale + tl.sum(tl.exp(z), axis=0)
            if k_on:
                anchor = tl.where(anchor > NEG_INF, anchor, b_max)
                levels = anchor - levels_step
                counts += tl.sum((s[:, None] >= levels[None, :]).to(tl.int32), axis=0)
                k_level = tl.max(tl.where(counts >= top_k, levels, NEG_INF), axis=0)
            theta = _candidate_theta(tl.log(z_sum), k_on, p_on, minp_on, top_p, min_p, log_v, k_on == 0)
            cand = (z >= theta - MARGIN_COLLECT) & (s >= k_level) & (s > NEG_INF)
            n_cand = tl.sum(cand.to(tl.int32), axis=0)
            if n_cand > 0:
                first = tl.atomic_add(counter_ptr + row64 * 2, n_cand, sem="relaxed")
                pos = first + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                ok = cand & (pos < CAP)
                tl.store(cand_s_ptr + row64 * CAP + pos, s, mask=ok)
                tl.store(cand_i_ptr + row64 * CAP + pos, cols, mask=ok)
        m_run = m_new

    part = row64 * n_split + pid
    tl.store(part_f_ptr + part * 3, m_run)
    tl.store(part_f_ptr + part * 3 + 1, z_sum)
    tl.store(part_f_ptr + part * 3 + 2, k_level)
    tl.store(part_i_ptr + part, arg)
    arrived = tl.atomic_add(counter_ptr + row64 * 2 + 1, 1, sem="acq_rel")  # release our writes / acquire theirs
    if arrived == n_split - 1:
        # ---- the last program of the row finishes it ------------------------------------------------------
        sp = tl.arange(0, S_POW2)
        sp_ok = sp < n_split
        pbase = row64 * n_split + sp
        ms = tl.load(part_f_ptr + pbase * 3, mask=sp_ok, other=NEG_INF, cache_modifier=".cg")
        zs = tl.load(part_f_ptr + pbase * 3 + 1, mask=sp_ok, other=0.0, cache_modifier=".cg")
        kls = tl.load(part_f_ptr + pbase * 3 + 2, mask=sp_ok, other=NEG_INF, cache_modifier=".cg")
        args = tl.load(part_i_ptr + pbase, mask=sp_ok, other=BIG_INDEX, cache_modifier=".cg")
        m = tl.max(ms, axis=0)
        first_max = tl.min(tl.where(ms == m, args, BIG_INDEX), axis=0)  # lowest index of the maximum of s
        z_total = tl.sum(tl.where(ms > NEG_INF, zs * tl.exp(_over_t(ms - m, temp_safe, inv_t)), 0.0), axis=0)
        k_floor = tl.max(kls, axis=0)
        n_total = tl.atomic_add(counter_ptr + row64 * 2, 0, sem="acquire")

        token = first_max
        logprob = tl.where(m > NEG_INF, 0.0, float("nan"))
        if sampled & (m > NEG_INF):
            seed = tl.load(seed_ptr + row64 * seed_s)
            step = tl.load(step_ptr + row64 * step_s)
            step_lo = (step & 0xFFFFFFFF).to(tl.uint32)
            step_hi = ((step >> 32) & 0xFFFFFFFF).to(tl.uint32)
            simple = (k_on | p_on | minp_on) == 0  # K* = every finite token; Z* = z_total
            if n_total <= CAP:
                # ---- candidate path: everything on a CAP-wide tile in registers ----------------------------
                pos = tl.arange(0, CAP)
                valid = pos < n_total
                cs = tl.load(cand_s_ptr + row64 * CAP + pos, mask=valid, other=NEG_INF, cache_modifier=".cg")
                ci = tl.load(cand_i_ptr + row64 * CAP + pos, mask=valid, other=BIG_INDEX, cache_modifier=".cg")
                z = _scaled(cs, m, temperature)
                theta = _candidate_theta(tl.log(z_total), k_on, p_on, minp_on, top_p, min_p, log_v, k_on == 0)
                closed = valid & (z > NEG_INF) & (z >= theta - MARGIN_FINISH) & (cs >= k_floor)
                zc = tl.where(closed, z, NEG_INF)
                n_closed = tl.sum(closed.to(tl.int32), axis=0)
                z_sorted = tl.sort(zc, descending=True)
                t_k = tl.full((), NEG_INF, tl.float32)
                if k_on & (n_closed >= top_k):
                    t_k = tl.min(tl.where(pos < top_k, z_sorted, POS_INF), axis=0)  # the k-th largest
                in_k = closed & (zc >= t_k)
                ez = tl.exp(zc)
                z_k = tl.where(k_on, tl.sum(tl.where(in_k, ez, 0.0), axis=0), z_total)
                keep = in_k
                if p_on:
                    q = tl.where(z_sorted >= t_k, tl.exp(z_sorted), 0.0) / z_k
                    mass_above = tl.cumsum(q, axis=0) - q
                    n_nucleus = tl.maximum(tl.sum((mass_above < top_p).to(tl.int32), axis=0), 1)
                    cut = tl.min(tl.where(pos < n_nucleus, z_sorted, POS_INF), axis=0)
                    keep = keep & (zc >= cut)
                if minp_on:
                    keep = keep & (ez >= min_p)
                cand_first_max = tl.min(tl.where(closed & (zc == 0.0), ci, BIG_INDEX), axis=0)
                keep = keep | (closed & (ci == cand_first_max))
                g = _gumbel(seed, step_lo, step_hi, ci)
                draw = tl.where(keep, zc + g, NEG_INF)
                best = tl.max(draw, axis=0)
                token = tl.min(tl.where(keep & (draw == best), ci, BIG_INDEX), axis=0)
                if WRITE_LOGPROBS:
                    z_token = tl.max(tl.where(ci == token, zc, NEG_INF), axis=0)
                    z_keep = tl.where(simple, z_total, tl.sum(tl.where(keep, ez, 0.0), axis=0))
                    logprob = z_token - tl.log(z_keep)
            else:
                # ---- exact fallback: NP-way search over order keys, one pass over the row per step ----------
                key_lo_init = _order_key(tl.full((), NEG_INF, tl.float32))
                key_zero = _order_key(tl.full((), 0.0, tl.float32))
                fractions = tl.arange(1, NP + 1).to(tl.int64)
                tk_key = key_lo_init
                cut_key = key_lo_init
                z_k = z_total
                if k_on:
                    # t_k = the largest key with count(key >= t_k) >= k; count(>= key(-inf)) = V >= k.
                    # Only finite tokens are counted above key(-inf), so if fewer than k are finite t_k = -inf.
                    lo = key_lo_init.to(tl.int64)
                    hi = key_zero.to(tl.int64) + 1  # count(key >= hi) = 0 < k
                    for _ in range(SEARCH_STEPS):
                        if hi - lo > 1:
                            pivots = lo + ((hi - lo) * fractions) // (NP + 1)
                            c, _t, _tok, _zt, _k = _fallback_pass(
                                0, pivots.to(tl.int32), tk_key, cut_key, m, temperature, min_p, first_max, seed,
                                step_lo, step_hi, V, base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row,
                                e3_row, a3_row, w0, w1, w2, w3, False, N_PAIRS, BLOCK, NP)  # fmt: skip
                            enough = c >= top_k
                            lo = tl.maximum(lo, tl.max(tl.where(enough, pivots, lo), axis=0))
                            hi = tl.minimum(hi, tl.min(tl.where(enough, hi, pivots), axis=0))
                    tk_key = lo.to(tl.int32)
                    bottom = tl.full((NP,), 0, tl.int32) + (key_lo_init - 1)
                    _c, sums, _tok, _zt, _k = _fallback_pass(
                        1, bottom, tk_key, cut_key, m, temperature, min_p, first_max, seed, step_lo,
                        step_hi, V, base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row, a3_row,
                        w0, w1, w2, w3, False, N_PAIRS, BLOCK, NP)  # fmt: skip
                    z_k = tl.max(sums, axis=0)
                if p_on:
                    cut_key = key_zero  # NaN or non-positive top_p: only the maximum's ties
                    if top_p > 0:
                        # cut = the smallest key whose mass strictly above is < p: keep key >= cut.
                        lo = key_lo_init.to(tl.int64)  # the mass above key(-inf) is all of K: >= p
                        hi = key_zero.to(tl.int64)  # nothing is above 0: < p
                        for _ in range(SEARCH_STEPS):
                            if hi - lo > 1:
                                pivots = lo + ((hi - lo) * fractions) // (NP + 1)
                                _c, above, _tok, _zt, _k = _fallback_pass(
                                    1, pivots.to(tl.int32), tk_key, cut_key, m, temperature, min_p, first_max,
                                    seed, step_lo, step_hi, V, base_row, e0_row, a0_row, e1_row, a1_row, e2_row,
                                    a2_row, e3_row, a3_row, w0, w1, w2, w3, False, N_PAIRS, BLOCK, NP)  # fmt: skip
                                below_p = above / z_k < top_p
                                hi = tl.minimum(hi, tl.min(tl.where(below_p, pivots, hi), axis=0))
                                lo = tl.maximum(lo, tl.max(tl.where(below_p, lo, pivots), axis=0))
                        cut_key = hi.to(tl.int32)
                no_pivots = tl.full((NP,), 0, tl.int32)
                _c, _s, token, z_token, z_keep = _fallback_pass(
                    2, no_pivots, tk_key, cut_key, m, temperature, tl.where(minp_on, min_p, 0.0), first_max,
                    seed, step_lo, step_hi, V, base_row, e0_row, a0_row, e1_row, a1_row, e2_row, a2_row, e3_row,
                    a3_row, w0, w1, w2, w3, HAS_TOPP, N_PAIRS, BLOCK, NP)  # fmt: skip
                logprob = z_token - tl.log(z_keep)
        # Last line of defence: whatever the inputs, never an id outside [0, V) (the first maximum, or 0).
        token = tl.where((token >= 0) & (token < V), token, tl.where((first_max >= 0) & (first_max < V), first_max, 0))
        tl.store(token_ptr + row64, token.to(tl.int64))
        if WRITE_LOGPROBS:
            tl.store(logprob_ptr + row64, logprob)
        else:  # no log-probability (the compiler drops its sums): only the fully-masked marker
            tl.store(logprob_ptr + row64, tl.where(m > NEG_INF, 0.0, float("nan")))

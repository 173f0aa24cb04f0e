"""The fused fast path of the twin's MAC on the CPU, compiled by numba (on first use, cached beside this file).

A batch is cut into chunks of vectors (shared out among threads, each running the kernel without the GIL) and each
chunk into row groups and tiles of columns (``cimlab.chip_sim.fastpath.plan_for`` sizes both to the caches). Per chunk the kernel

1. draws the chunk's random items straight from the PCG64 stream of ``cimlab.chip_sim.rng.VectorStream``: the same
   128-bit LCG and XSL-RR output as numpy's ``PCG64.random_raw``; the chunk's words are one run of the stream, which
   32 LCG states, each jumped to its first word at once (``pcg_jump``), step 32 words at a time in vector registers;
2. turns each vector's input slices into row patterns: ``block_rows`` rows' slices of one plane packed into one
   small integer per (plane, row group, block);
3. per row group and tile of columns, and per (vector, plane) of the chunk, sums the compute weights of the
   pattern of every block from the pattern tables (``build_tables``: the sum of the weights each pattern selects,
   one row per pattern, exact integers in float32); where a pattern would be too wide it sums the rows one by one;
4. converts the sums of a block of (vector, plane) pairs' tiles at once (``BLOCK_LANES``), 16 lanes at a time with
   vector gathers for the table look-ups: the analytic converter's three float32 operations with its noise-table
   and ADC look-ups, or the data-driven converter's inverse-CDF draw (an indexed search: a guide table settles
   most draws, the row's bounds the rest; narrow models read the three codes around the row's most likely
   one first);
5. writes the codes (MAC_RAW) or adds them, weighted by their input slice, to the vector's column sums (MAC).

Partial sums are sums of integers below 2**24, exact in float32 in any order; after them every step is the one
``Converter.convert`` defines, in the same order and precision (no fast-math, so no fused multiply-add), so the
codes are bit-identical to the numpy definition and to the reference mode.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from cimlab.chip_sim.fastpath import NEAR_BITS

PCG_MULT_HI = np.uint64(0x2360ED051FC65DA4)
PCG_MULT_LO = np.uint64(0x4385DF649FCCF645)
"""numpy's PCG64 multiplier (PCG_DEFAULT_MULTIPLIER_128), split in 64-bit halves."""

KIND_ANALYTIC = 0
KIND_SAMPLED = 1
STAGE_ITEMS, STAGE_SUMS, STAGE_SCALE, STAGE_LOOKUP, STAGE_OUT = 1, 2, 3, 4, 5
"""The kernel's stages, in order: random items, partial sums, scale/offset/noise, ADC or sampler look-up, codes
out (written, or weighted into the column sums). ``fused_mac`` runs the first ``stages`` of them after the input
patterns; the benchmark times it with fewer to see where the time goes."""
ALL_STAGES = STAGE_OUT
LANES = 16
"""Lanes of one vector gather (a 512-bit register of 32-bit values; narrower machines split it)."""
BLOCK_LANES = 1024
"""Lanes converted per step: the tiles of as many (vector, input slice) pairs as fit, so that a step's set-up is
shared by many conversions while its buffers stay in L1 (512 and 1024 were the fastest in A/B runs)."""
PCG_VECTOR = 8
PCG_LANES = 32
"""PCG64 states stepped side by side when drawing words: ``PCG_LANES`` in vector registers of ``PCG_VECTOR`` 64-bit
lanes (several registers, so that their multiply chains overlap)."""

_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I128 = ir.IntType(128)


# ---- 128-bit LCG (PCG64) ---------------------------------------------------------------------------------------
def _wide(builder: ir.IRBuilder, hi: ir.Value, lo: ir.Value) -> ir.Value:
    return builder.or_(builder.shl(builder.zext(hi, _I128), ir.Constant(_I128, 64)), builder.zext(lo, _I128))


@intrinsic
def _mul_add_128(typingctx, ahi, alo, bhi, blo, chi, clo):  # noqa: ANN001, ANN202, ARG001
    """``(a * b + c) mod 2**128`` of 128-bit numbers given as (hi, lo) uint64 halves; returns (hi, lo)."""
    u64 = types.uint64
    sig = types.UniTuple(u64, 2)(u64, u64, u64, u64, u64, u64)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        a = _wide(builder, args[0], args[1])
        b = _wide(builder, args[2], args[3])
        c = _wide(builder, args[4], args[5])
        r = builder.add(builder.mul(a, b), c)
        lo = builder.trunc(r, _I64)
        hi = builder.trunc(builder.lshr(r, ir.Constant(_I128, 64)), _I64)
        return context.make_tuple(builder, signature.return_type, (hi, lo))

    return sig, codegen


@intrinsic
def _xsl_rr(typingctx, hi, lo):  # noqa: ANN001, ANN202, ARG001
    """PCG64's output function: ``rotr64(hi ^ lo, hi >> 58)``."""
    sig = types.uint64(types.uint64, types.uint64)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        h, lo_ = args
        x = builder.xor(h, lo_)
        rot = builder.lshr(h, ir.Constant(_I64, 58))
        back = builder.and_(builder.sub(ir.Constant(_I64, 64), rot), ir.Constant(_I64, 63))
        return builder.or_(builder.lshr(x, rot), builder.shl(x, back))

    return sig, codegen


@njit(cache=True)
def pcg_jump(inc_hi: np.uint64, inc_lo: np.uint64, delta: int) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    """The affine map of ``delta`` LCG steps with increment (inc hi, inc lo): state ``s`` goes to ``a * s + c`` mod
    2**128 (Brown's jump-ahead, as numpy's ``PCG64.advance``); returns (a hi, a lo, c hi, c lo)."""
    zero = np.uint64(0)
    m_hi, m_lo = zero, np.uint64(1)  # accumulated multiplier
    p_hi, p_lo = zero, zero  # accumulated increment
    c_hi, c_lo = PCG_MULT_HI, PCG_MULT_LO
    d_hi, d_lo = inc_hi, inc_lo
    while delta > 0:
        if delta & 1:
            m_hi, m_lo = _mul_add_128(m_hi, m_lo, c_hi, c_lo, zero, zero)
            p_hi, p_lo = _mul_add_128(p_hi, p_lo, c_hi, c_lo, d_hi, d_lo)
        d_hi, d_lo = _mul_add_128(c_hi, c_lo, d_hi, d_lo, d_hi, d_lo)  # (mult + 1) * inc
        c_hi, c_lo = _mul_add_128(c_hi, c_lo, c_hi, c_lo, zero, zero)
        delta >>= 1
    return m_hi, m_lo, p_hi, p_lo


@njit(cache=True)
def pcg_advance(state: np.ndarray, delta: int) -> tuple[np.uint64, np.uint64]:
    """The LCG state ``delta`` steps after ``state`` = [state hi, state lo, inc hi, inc lo]; returns (hi, lo)."""
    a_hi, a_lo, c_hi, c_lo = pcg_jump(state[2], state[3], delta)
    return _mul_add_128(a_hi, a_lo, state[0], state[1], c_hi, c_lo)


def _vector_at(builder: ir.IRBuilder, context, ty, value, start, lanes: int = LANES):  # noqa: ANN001, ANN202
    """A pointer to ``lanes`` elements of array ``value`` (numba type ``ty``) from element ``start``, as a vector."""
    arr = context.make_array(ty)(context, builder, value=value)
    return builder.bitcast(builder.gep(arr.data, [start]),
                           ir.VectorType(context.get_data_type(ty.dtype), lanes).as_pointer())


def _splat(builder: ir.IRBuilder, value: ir.Value, lanes: int) -> ir.Value:
    vec = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vec, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(_I32, lanes), [0] * lanes))


@intrinsic
def _pcg_round(typingctx, hi, lo, out, at, jump):  # noqa: ANN001, ANN202, ARG001
    """One round of ``PCG_LANES`` LCG states (``hi``, ``lo``: uint64 arrays of their halves), ``PCG_VECTOR`` in
    each vector register: ``out[at + l]`` = the XSL-RR output of state ``l``, then every state takes the jump
    (a hi, a lo, c hi, c lo) of ``pcg_jump``: ``s = a * s + c`` mod 2**128, the 64 x 64-bit product of the low
    halves from 32-bit halves (vector registers multiply 32 x 32 -> 64 bits)."""
    sig = types.void(hi, lo, out, at, jump)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        t_hi, t_lo, t_out = signature.args[:3]
        vec = ir.VectorType(_I64, PCG_VECTOR)
        a_hi, a_lo, c_hi, c_lo = (_splat(builder, builder.extract_value(args[4], i), PCG_VECTOR) for i in range(4))
        low32, by32 = ir.Constant(vec, [0xFFFFFFFF] * PCG_VECTOR), ir.Constant(vec, [32] * PCG_VECTOR)
        a0, a1 = builder.and_(a_lo, low32), builder.lshr(a_lo, by32)
        rotr = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                              f"llvm.fshr.v{PCG_VECTOR}i64")
        for v in range(0, PCG_LANES, PCG_VECTOR):
            off = ir.Constant(_I64, v)
            p_hi = _vector_at(builder, context, t_hi, args[0], off, PCG_VECTOR)
            p_lo = _vector_at(builder, context, t_lo, args[1], off, PCG_VECTOR)
            p_out = _vector_at(builder, context, t_out, args[2], builder.add(args[3], off), PCG_VECTOR)
            h, lo = builder.load(p_hi, align=8), builder.load(p_lo, align=8)
            x = builder.xor(h, lo)
            builder.store(builder.call(rotr, [x, x, builder.lshr(h, ir.Constant(vec, [58] * PCG_VECTOR))]), p_out,
                          align=8)
            l0, l1 = builder.and_(lo, low32), builder.lshr(lo, by32)
            p00, p01, p10, p11 = (builder.mul(u, w) for u, w in ((l0, a0), (l0, a1), (l1, a0), (l1, a1)))
            mid = builder.add(builder.add(builder.lshr(p00, by32), builder.and_(p01, low32)), builder.and_(p10, low32))
            prod_lo = builder.or_(builder.shl(mid, by32), builder.and_(p00, low32))
            prod_hi = builder.add(builder.add(p11, builder.lshr(p01, by32)),
                                  builder.add(builder.lshr(p10, by32), builder.lshr(mid, by32)))
            prod_hi = builder.add(prod_hi, builder.add(builder.mul(h, a_lo), builder.mul(lo, a_hi)))
            new_lo = builder.add(prod_lo, c_lo)
            carry = builder.zext(builder.icmp_unsigned("<", new_lo, prod_lo), vec)
            builder.store(builder.add(builder.add(prod_hi, c_hi), carry), p_hi, align=8)
            builder.store(new_lo, p_lo, align=8)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def pcg_fill(out: np.ndarray, state: np.ndarray, first_word: int) -> None:
    """``out[k]`` = raw word ``first_word + k`` of the PCG64 stream whose state (at word 0) is ``state``:
    what ``PCG64.advance(first_word)`` then ``random_raw(out.size)`` give."""
    _pcg_fill_lanes(out, state, first_word, np.empty((2, PCG_LANES), dtype=np.uint64))


@njit(cache=True, nogil=True)
def _pcg_fill_lanes(out, state, first_word, lanes):  # noqa: ANN001
    """``pcg_fill`` in ``lanes`` [2, ``PCG_LANES``] (uint64, the states' halves): each state at its own word of a
    run of ``PCG_LANES``, they jump a run at a time in vector registers; the words left over are stepped one by
    one. Allocates nothing (the fused kernel runs without reference counting)."""
    n = out.size
    runs = n // PCG_LANES
    if runs > 0:
        jump = pcg_jump(state[2], state[3], PCG_LANES)
        hi, lo = lanes[0], lanes[1]
        for lane in range(PCG_LANES):
            hi[lane], lo[lane] = pcg_advance(state, first_word + lane + 1)  # word w is the output of state w + 1
        for r in range(runs):
            _pcg_round(hi, lo, out, r * PCG_LANES, jump)
    h, low = pcg_advance(state, first_word + runs * PCG_LANES)
    for k in range(runs * PCG_LANES, n):
        h, low = _mul_add_128(h, low, PCG_MULT_HI, PCG_MULT_LO, state[2], state[3])
        out[k] = _xsl_rr(h, low)


@njit(cache=True, nogil=True)
def pcg_fill_vectors(out: np.ndarray, state: np.ndarray, first_vector: int) -> None:
    """``out[b]`` [n, words] (C-contiguous) = the words of vector ``first_vector + b`` (words ``(first_vector + b)
    * words ..``): one run of the stream, as the vectors' words follow each other."""
    pcg_fill(out.reshape(-1), state, first_vector * out.shape[1])


# ---- vector gathers --------------------------------------------------------------------------------------------



def _gather_values(builder: ir.IRBuilder, context, ty, value, index):  # noqa: ANN001, ANN202
    """``value[index]``, a vector, for a vector ``index`` of ``LANES`` int32: one ``llvm.masked.gather`` (vector
    gathers where the machine has them, scalar loads elsewhere) from array ``value`` (numba type ``ty``, 32- or
    64-bit elements)."""
    table = context.make_array(ty)(context, builder, value=value)
    elt = context.get_data_type(ty.dtype)
    size = ty.dtype.bitwidth // 8
    vec = ir.VectorType(elt, LANES)
    v_i64 = ir.VectorType(_I64, LANES)
    base = builder.insert_element(ir.Constant(v_i64, None), builder.ptrtoint(table.data, _I64), ir.Constant(_I32, 0))
    base = builder.shuffle_vector(base, base, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))
    offset = builder.mul(builder.sext(index, v_i64), ir.Constant(v_i64, [size] * LANES))
    ptrs = builder.inttoptr(builder.add(base, offset), ir.VectorType(elt.as_pointer(), LANES))
    kind = ("f" if isinstance(elt, (ir.FloatType, ir.DoubleType)) else "i") + str(size * 8)
    fnty = ir.FunctionType(vec, [ptrs.type, _I32, ir.VectorType(_I1, LANES), vec])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.gather.v{LANES}{kind}.v{LANES}p0")
    return builder.call(fn, [ptrs, ir.Constant(_I32, size), ir.Constant(ir.VectorType(_I1, LANES), [1] * LANES),
                             ir.Constant(vec, None)])


@intrinsic
def _gather16(typingctx, table, index, start, out):  # noqa: ANN001, ANN202, ARG001
    """``out[start : start + 16] = table[index[start : start + 16]]``: 32- or 64-bit elements, int32 indices."""
    bits = table.dtype.bitwidth
    if not (bits in (32, 64) and out.dtype == table.dtype and index.dtype == types.int32):
        return None
    sig = types.void(table, index, start, out)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        t_ty, i_ty, _, o_ty = signature.args
        idx = builder.load(_vector_at(builder, context, i_ty, args[1], args[2]), align=4)
        got = _gather_values(builder, context, t_ty, args[0], idx)
        builder.store(got, _vector_at(builder, context, o_ty, args[3], args[2]), align=bits // 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _near16(typingctx, acc, cols, J, near_a, near_b, items, start, rows, codes, flags):  # noqa: ANN001, ANN202, ARG001
    """For lanes ``start .. start + 16``: ``rows`` = level * J + column of partial sums ``acc`` (float32) and columns
    ``cols`` (int32); ``codes`` = the codes the near-codes tables ``near_a``, ``near_b`` give their uniforms ``items``
    (uint32), and ``flags`` 1 where they give none (see ``cimlab.chip_sim.fastpath.near_tables``). 32-bit lanes
    throughout: numba would widen the same arithmetic to 64 bits, half as many lanes a register."""
    i32, u32 = types.int32, types.uint32
    if not (acc.dtype == types.float32 and cols.dtype == rows.dtype == codes.dtype == flags.dtype == i32
            and near_a.dtype == near_b.dtype == items.dtype == u32):
        return None
    sig = types.void(acc, cols, J, near_a, near_b, items, start, rows, codes, flags)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        t_acc, t_cols, _, t_a, t_b, t_items, _, t_rows, t_codes, t_flags = signature.args
        at = args[6]
        vec = ir.VectorType(_I32, LANES)

        def splat(v: int) -> ir.Constant:
            return ir.Constant(vec, [v] * LANES)

        level = builder.fptosi(builder.load(_vector_at(builder, context, t_acc, args[0], at), align=4), vec)
        jv = _splat(builder, context.cast(builder, args[2], signature.args[2], types.int32), LANES)
        row = builder.add(builder.mul(level, jv), builder.load(_vector_at(builder, context, t_cols, args[1], at),
                                                               align=4))
        builder.store(row, _vector_at(builder, context, t_rows, args[7], at), align=4)
        a = _gather_values(builder, context, t_a, args[3], row)
        b = _gather_values(builder, context, t_b, args[4], row)
        q = builder.lshr(builder.load(_vector_at(builder, context, t_items, args[5], at), align=4),
                         splat(32 - NEAR_BITS))
        mask = splat((1 << NEAR_BITS) - 1)
        q0, q1 = builder.and_(a, mask), builder.and_(builder.lshr(a, splat(NEAR_BITS)), mask)
        q2, q3 = builder.and_(b, mask), builder.and_(builder.lshr(b, splat(NEAR_BITS)), mask)
        c0 = builder.or_(builder.lshr(a, splat(2 * NEAR_BITS)),
                         builder.shl(builder.lshr(b, splat(2 * NEAR_BITS)), splat(32 - 2 * NEAR_BITS)))
        code = builder.add(c0, builder.add(builder.zext(builder.icmp_unsigned(">", q, q1), vec),
                                           builder.zext(builder.icmp_unsigned(">", q, q2), vec)))
        off = builder.or_(builder.or_(builder.icmp_unsigned("<=", q, q0), builder.icmp_unsigned(">=", q, q3)),
                          builder.or_(builder.icmp_unsigned("==", q, q1), builder.icmp_unsigned("==", q, q2)))
        builder.store(code, _vector_at(builder, context, t_codes, args[8], at), align=4)
        builder.store(builder.zext(off, vec), _vector_at(builder, context, t_flags, args[9], at), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _analytic16(typingctx, acc, sc, sh, noise, lut, items, start, item_at, noisy, lookup, codes):  # noqa: ANN001, ANN202, ARG001
    """For lanes ``start .. start + 16``: ``codes`` = the ADC look-up table ``lut`` at ``acc * sc + sh`` (float32)
    plus, if ``noisy``, ``noise[items[item_at ..]]``, truncated and clamped to the table; without ``lookup``, the
    clamped index itself. One pass in vector registers."""
    f32, i32 = types.float32, types.int32
    if not (acc.dtype == sc.dtype == sh.dtype == noise.dtype == f32 and lut.dtype == codes.dtype == i32
            and items.dtype == types.uint16):
        return None
    sig = types.void(acc, sc, sh, noise, lut, items, start, item_at, noisy, lookup, codes)

    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
        t_acc, t_sc, t_sh, t_noise, t_lut, t_items, _, _, _, _, t_codes = signature.args
        at = args[6]
        vf = ir.VectorType(ir.FloatType(), LANES)
        vi = ir.VectorType(_I32, LANES)
        f = builder.fmul(builder.load(_vector_at(builder, context, t_acc, args[0], at), align=4),
                         builder.load(_vector_at(builder, context, t_sc, args[1], at), align=4))
        f = builder.fadd(f, builder.load(_vector_at(builder, context, t_sh, args[2], at), align=4))
        before = builder.block
        with builder.if_then(context.cast(builder, args[8], signature.args[8], types.boolean)):
            idx = builder.zext(builder.load(_vector_at(builder, context, t_items, args[5], args[7]), align=2), vi)
            noisy_f = builder.fadd(f, _gather_values(builder, context, t_noise, args[3], idx))
            noisy_block = builder.block
        phi = builder.phi(vf)
        phi.add_incoming(f, before)
        phi.add_incoming(noisy_f, noisy_block)
        i = builder.fptosi(phi, vi)
        zero = ir.Constant(vi, [0] * LANES)
        lut_arr = context.make_array(t_lut)(context, builder, value=args[4])
        top = _splat(builder, builder.trunc(builder.sub(builder.extract_value(lut_arr.shape, 0),
                                                        ir.Constant(_I64, 1)), _I32), LANES)
        i = builder.select(builder.icmp_signed(">", i, zero), i, zero)
        i = builder.select(builder.icmp_signed("<", i, top), i, top)
        before = builder.block
        with builder.if_then(context.cast(builder, args[9], signature.args[9], types.boolean)):
            looked = _gather_values(builder, context, t_lut, args[4], i)
            looked_block = builder.block
        code = builder.phi(vi)
        code.add_incoming(i, before)
        code.add_incoming(looked, looked_block)
        builder.store(code, _vector_at(builder, context, t_codes, args[10], at), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _gather(table, index, n, out):  # noqa: ANN001
    """``out[:n] = table[index[:n]]`` in blocks of ``LANES`` (the buffers are padded; extra lanes hold valid
    indices)."""
    for start in range(0, n, LANES):
        _gather16(table, index, start, out)


# ---- pattern tables --------------------------------------------------------------------------------------------
@njit(cache=True)
def build_tables(w, rowsum, slice_bits, block_rows, groups, table, level_table):  # noqa: ANN001
    """Pattern tables of the row groups flagged in ``groups``: ``table[g, t, k, pat]`` [tile] = the weights block
    ``k`` of group ``g`` sums for input pattern ``pat`` (digit ``i`` of ``pat``, ``slice_bits`` wide, drives row
    ``k * block_rows + i``) on the columns of tile ``t``, and ``level_table[g, k, pat]`` the matching sum of
    ``rowsum`` (energy estimate). Each (group, tile) is one contiguous block, so it can sit in cache whole."""
    G, R, J = w.shape
    n_tiles, n_blocks, n_patterns, tile = table.shape[1:]
    digit_max = (1 << slice_bits) - 1
    for g in range(G):
        if not groups[g]:
            continue
        for k in range(n_blocks):
            table[g, :, k, 0, :] = 0.0
            level_table[g, k, 0] = 0
            for pat in range(1, n_patterns):
                top = 0  # highest nonzero digit of pat
                for i in range(block_rows):
                    if (pat >> (i * slice_bits)) & digit_max:
                        top = i
                d = (pat >> (top * slice_bits)) & digit_max
                rest = pat - (d << (top * slice_bits))
                r = k * block_rows + top
                dw = np.float32(d) if r < R else np.float32(0.0)
                r = min(r, R - 1)
                for t in range(n_tiles):
                    for jj in range(tile):
                        j = t * tile + jj
                        add = dw * w[g, r, j] if j < J else np.float32(0.0)
                        table[g, t, k, pat, jj] = table[g, t, k, rest, jj] + add
                level_table[g, k, pat] = level_table[g, k, rest] + (d * rowsum[g * R + r] if dw != 0 else 0)


@njit(cache=True)
def _vector_patterns(xrow, n_planes, slice_bits, rpg, block_rows, g0, use_table, level_table, pulse_table,  # noqa: ANN001
                     rowsum, pats):
    """One vector's row patterns ``pats[(p * groups + gi) * blocks + k]``: the slices of plane ``p`` of the rows
    of block ``k`` of spanned group ``gi``, packed (``xrow``: the vector's inputs on the spanned groups' rows, 0
    outside the request). Returns the vector's (level sum, word-line pulses) for the energy estimate."""
    gs = xrow.size // rpg
    n_blocks = (rpg + block_rows - 1) // block_rows
    n_patterns = level_table.shape[2]
    levels = level_table.reshape(-1)
    digit_max = (1 << slice_bits) - 1
    level_sum = 0
    pulses = 0
    if slice_bits == 1 and block_rows <= 8 and n_planes <= 8 and use_table:
        # bit-serial inputs of at most 8 bits: a block's inputs as the bytes of one word, and bit p of each byte
        # gathered into a pattern by one multiplication
        ones = np.uint64(0x0101010101010101)
        spread = np.uint64(0x0102040810204080)
        plane_stride = np.uint64(gs * n_blocks)
        for gi in range(gs):
            for k in range(n_blocks):
                r0 = np.uint64(gi * rpg + k * block_rows)
                word = np.uint64(0)
                for i in range(np.uint64(min(block_rows, rpg - k * block_rows))):
                    word |= np.uint64(xrow[r0 + i]) << (np.uint64(8) * i)
                level_row = np.uint64(((g0 + gi) * n_blocks + k) * n_patterns)
                at = np.uint64(gi * n_blocks + k)
                for p in range(np.uint64(n_planes)):
                    pat = (((word >> p) & ones) * spread) >> np.uint64(56)
                    pats[at + p * plane_stride] = np.int32(pat)
                    level_sum += levels[level_row + pat]
                    pulses += pulse_table[pat]
        return level_sum, pulses
    for p in range(n_planes):
        shift = p * slice_bits
        for gi in range(gs):
            for k in range(n_blocks):
                r0 = gi * rpg + k * block_rows
                pat = 0
                for i in range(min(block_rows, rpg - k * block_rows)):
                    pat |= ((xrow[r0 + i] >> shift) & digit_max) << (i * slice_bits)
                pats[(p * gs + gi) * n_blocks + k] = pat
                if use_table:
                    level_sum += levels[((g0 + gi) * n_blocks + k) * n_patterns + pat]
                    pulses += pulse_table[pat]
                elif pat != 0:
                    level_sum += pat * rowsum[g0 * rpg + r0]
                    pulses += 1
    return level_sum, pulses


@njit(cache=True, inline="always")
def _sum_table_pairs(acc, stride, table, pats, q0, nq, gs, gi, base, n_blocks, block_stride, row_stride, tn):  # noqa: ANN001
    """For pairs ``q`` = 0 .. ``nq``-1 (vector, input slice) ``q0 + q`` of the chunk: ``acc[q * stride :][:tn]`` =
    the sum over blocks ``k`` of table row ``base + k * block_stride + pats[pat0 + k] * row_stride`` (``pat0``: the
    pair's patterns of group ``gi``), four rows per pass over the lanes (a row of pattern 0 is zeros, so none is
    skipped). Offsets are unsigned: numba then reads the lanes as one contiguous run."""
    tu = np.uint64(tn)
    for q in range(np.uint64(nq)):
        a0 = q * np.uint64(stride)
        pat0 = ((np.uint64(q0) + q) * np.uint64(gs) + np.uint64(gi)) * np.uint64(n_blocks)
        o0 = np.uint64(base + pats[pat0] * row_stride)
        for jj in range(tu):
            acc[a0 + jj] = table[o0 + jj]
        k = 1
        while k + 4 <= n_blocks:
            ku = np.uint64(k)
            o0 = np.uint64(base + k * block_stride + pats[pat0 + ku] * row_stride)
            o1 = np.uint64(base + (k + 1) * block_stride + pats[pat0 + ku + np.uint64(1)] * row_stride)
            o2 = np.uint64(base + (k + 2) * block_stride + pats[pat0 + ku + np.uint64(2)] * row_stride)
            o3 = np.uint64(base + (k + 3) * block_stride + pats[pat0 + ku + np.uint64(3)] * row_stride)
            for jj in range(tu):
                acc[a0 + jj] += (table[o0 + jj] + table[o1 + jj]) + (table[o2 + jj] + table[o3 + jj])
            k += 4
        while k < n_blocks:
            o0 = np.uint64(base + k * block_stride + pats[pat0 + np.uint64(k)] * row_stride)
            for jj in range(tu):
                acc[a0 + jj] += table[o0 + jj]
            k += 1


# ---- the fused MAC ---------------------------------------------------------------------------------------------
# Inner loops index 1-D arrays at an unsigned offset: numba's multi-dimensional indexing, and its wraparound of
# negative signed indices, keep LLVM from reading the lanes as one contiguous run (it gathers them one by one
# instead).
@njit(cache=True, inline="always")
def _pair_items(q, n_planes, items_per_vector, at):  # noqa: ANN001, ANN202
    """Where the random items of pair ``q`` (vector, input slice) of the chunk on the tile ``at`` = (groups, group,
    J, first column) start among the chunk's items."""
    n_groups, g, J, t0 = at
    bb, p = divmod(q, n_planes)
    return np.uint64(bb * items_per_vector + (p * n_groups + g) * J + t0)


@njit(cache=True, inline="always")
def _convert_analytic(acc, sc, sh, noisy, noise, lut, items, q0, nq, n_planes, items_per_vector, at, stride, codes,  # noqa: ANN001
                      stages):
    """Codes of the partial sums of pairs ``q0 .. q0 + nq`` (``acc[q * stride ..]``, see ``_block_items``) with
    their columns' scale and shift and, if ``noisy``, their noise items: ``_analytic16`` over each pair's lanes."""
    if stages < STAGE_SCALE:
        return
    lookup = stages >= STAGE_LOOKUP
    i0 = np.uint64(0)
    for q in range(nq):
        if noisy:
            i0 = _pair_items(q0 + q, n_planes, items_per_vector, at)
        for s in range(0, stride, LANES):
            _analytic16(acc, sc, sh, noise, lut, items, q * stride + s, i0 + np.uint64(s), noisy, lookup, codes)


@njit(cache=True, inline="always")
def _flagged(flags, lane, tn):  # noqa: ANN001
    """``lane[:n]`` = the lanes ``jj < tn`` whose ``flags[jj]`` is 1, in order; returns ``n``. A run of ``LANES``
    lanes without a flag costs one vector test (flags past ``tn`` in the last run must be 0)."""
    n = 0
    for q0 in range(0, tn, LANES):
        any_ = np.int32(0)
        for q in range(LANES):
            any_ |= flags[q0 + q]
        if any_ != 0:
            for jj in range(q0, min(q0 + LANES, tn)):
                lane[n] = jj
                n += flags[jj]
    return n


@njit(cache=True, inline="always")
def near_codes(acc, cols, J, near_a, near_b, items, rows, codes, flags, tn):  # noqa: ANN001
    """``_near16`` over lanes ``0 .. tn`` (the buffers hold whole runs of ``LANES``)."""
    for start in range(0, tn, LANES):
        _near16(acc, cols, J, near_a, near_b, items, start, rows, codes, flags)


@njit(cache=True, inline="always")
def _convert_sampled(acc, cols, J, items, sampled, ibuf, flags, lane, found, codes, tn):  # noqa: ANN001
    """Codes of levels ``acc[:tn]`` of columns ``cols[:tn]`` (of ``J``) drawn with 32-bit uniforms
    ``items`` by an indexed search (``sampled``: see ``fused_mac``). The guide entry of the uniform's bucket (its
    top ``guide_bits`` bits) in the row (``level * J + column``) holds the codes of the bucket's first and last
    uniform, low | high << 16; most buckets hold one code, and the others are finished by counting the row's
    bounds from the low code on, read from its window (the bound of code ``c`` at ``window[rowbase[row] + c]``;
    see ``cimlab.chip_sim.fastpath.guide_tables``). With ``near_first``, the row's three codes around its most
    likely one are read first (``near_codes``), and only the uniforms they leave are searched."""
    near_first, near_a, near_b, guide, guide_bits, window, rowbase = sampled
    shift = np.uint64(32 - guide_bits)  # 64-bit: one bucket (no bits) shifts by all 32
    if near_first:
        near_codes(acc, cols, J, near_a, near_b, items, ibuf, codes, flags, tn)
        nm = _flagged(flags, lane, tn)
        for i in range(nm):
            jj = np.uint64(lane[i])
            ibuf[jj] = (ibuf[jj] << np.int32(guide_bits)) + np.int32(np.uint64(items[jj]) >> shift)
            found[jj] = guide[np.uint64(ibuf[jj])]
    else:
        for jj in range(tn):
            row = np.int32(acc[jj]) * np.int32(J) + cols[jj]
            ibuf[jj] = (row << np.int32(guide_bits)) + np.int32(np.uint64(items[jj]) >> shift)
        _gather(guide, ibuf, tn, found)
        nm = 0  # most rows are wide here: many runs of lanes hold a bucket still to search
        for jj in range(tn):
            low = found[jj] & np.uint32(0xFFFF)
            codes[jj] = np.int32(low)
            lane[nm] = jj
            nm += np.int32((found[jj] >> np.uint32(16)) != low)
    for i in range(nm):
        jj = np.uint64(lane[i])
        u = np.uint32(items[jj])
        base = np.uint64(rowbase[np.uint64(ibuf[jj] >> np.int32(guide_bits))])
        c = np.uint64(found[jj] & np.uint32(0xFFFF))
        high = np.uint64(found[jj] >> np.uint32(16))
        while c < high and window[base + c] <= u:
            c += np.uint64(1)
        codes[jj] = np.int32(c)


@njit(cache=True, inline="always")
def _block_items(dst, items, q0, nq, n_planes, items_per_vector, at, stride, tn):  # noqa: ANN001
    """``dst[q * stride :][:tn]`` = the random items of pair ``q0 + q`` (vector, input slice) of the chunk on the
    tile ``at`` = (groups, group, J, first column), for the ``nq`` pairs of a block."""
    for q in range(nq):
        i0 = _pair_items(q0 + q, n_planes, items_per_vector, at)
        c0 = np.uint64(q * stride)
        for jj in range(np.uint64(tn)):
            dst[c0 + jj] = items[i0 + jj]


@njit(cache=True, nogil=True)
def fused_mac(x, row_start, geometry, w, sums_from, kind, analytic, sampled, rng, raw, out, col_sums, tally):  # noqa: ANN001
    """Codes (``raw``) or slice-weighted column sums of a batch; see the module docstring.

    Args:
        x: input codes [n, n_rows] (uint16) of rows ``row_start ..``.
        geometry: (n_planes, slice_bits, n_groups, rows per group, J, g0, g1, chunk vectors, tile columns,
            block_rows, stages: ``ALL_STAGES``, or fewer to time the kernel without its later stages, first chunk,
            chunk step: this call does chunks ``first, first + step, ..`` of the batch, so that several threads can
            share a batch, the GIL released).
        w: compute weights [n_groups, rows per group, J] float32 (exact integers).
        sums_from: (pattern table [n_groups, tiles, blocks, patterns, tile] f32, its level sums [n_groups, blocks,
            patterns] int64, pulses per pattern [patterns] int64, use the table (else sum rows one by one),
            rowsum [n_groups * rows per group] int64).
        kind: ``KIND_ANALYTIC`` or ``KIND_SAMPLED``.
        analytic: (scale [J] f32, shift [J] f32, noise table [65536] f32 or empty, ADC look-up table int32).
        sampled: (near codes first, near-codes tables a and b [L*J] uint32, guide table [L*J * 2**guide_bits]
            uint32, guide_bits, windows uint32, each row's window start less its first code [L*J] int64; see
            ``_convert_sampled`` and ``cimlab.chip_sim.fastpath.near_tables`` and ``guide_tables``).
        rng: (PCG64 state at word 0 as uint64[4], first vector, words per vector, item bytes: 0, 2 or 4).
        raw: write codes to ``out`` [n, P, g1-g0, J]; otherwise add ``code << (p * slice_bits)`` into
            ``col_sums`` [n, J] (int64, zeroed by the caller).
        tally: [n, 2] int64 out: per vector, level sum and word-line pulses.

    The call's buffers are allocated here (``_buffers``); the work is done by ``_fused_chunks``.
    """
    _fused_chunks(x, row_start, geometry, w, sums_from, kind, analytic, sampled, rng, raw, out, col_sums, tally,
                  _buffers(geometry, kind, rng[2]))


@njit(cache=True, inline="always")
def _padded(tile):  # noqa: ANN001, ANN202
    """Lanes a tile of ``tile`` columns takes: a whole number of ``LANES``."""
    return (tile + LANES - 1) // LANES * LANES


@njit(cache=True, inline="always")
def _block_pairs(pairs, tile_pad):  # noqa: ANN001, ANN202
    """(vector, input slice) pairs converted per step, of ``pairs``: as many tiles as ``BLOCK_LANES`` holds."""
    return max(1, min(pairs, BLOCK_LANES // tile_pad))


@njit(cache=True)
def _buffers(geometry, kind, words):  # noqa: ANN001, ANN202
    """The buffers ``_fused_chunks`` works in, sized for its largest chunk: the chunk's random words and the LCG
    states that draw them, its input patterns, one vector's inputs on the spanned groups' rows (zeros outside the
    request), each tile's lanes' columns, scale and shift, and a block's lanes (partial sums, int32 quantities, guide
    entries, 32-bit items)."""
    n_planes, _, _, rpg, J, g0, g1, chunk, tile, block_rows = geometry[:10]
    n_blocks = (rpg + block_rows - 1) // block_rows
    tile_pad = _padded(tile)
    lanes = _block_pairs(chunk * n_planes, tile_pad) * tile_pad
    tiles = (J + tile - 1) // tile
    # the chunk's words, and 4 more: a tile's padding lanes read the 2-byte items after its last column's
    words_all = np.empty(chunk * max(words, 1) + 4, dtype=np.uint64)
    words_all[-4:] = 0
    return (words_all, np.empty((2, PCG_LANES), dtype=np.uint64),
            np.empty(chunk * n_planes * (g1 - g0) * n_blocks, dtype=np.int32),
            np.zeros((g1 - g0) * rpg, dtype=np.int64),
            np.zeros((tiles, lanes), dtype=np.int32), np.zeros((2, tiles, lanes), dtype=np.float32),
            np.zeros(lanes, dtype=np.float32), np.zeros((4, lanes), dtype=np.int32),
            np.zeros(lanes, dtype=np.uint32), np.zeros(lanes if kind == KIND_SAMPLED else 0, dtype=np.uint32))


# Compiled without reference counting: numba takes a reference (an atomic update) to every array each inlined step
# is given, some twenty per block of lanes, 4-12 % of the time on the smaller profiles. Nothing here allocates, and
# ``fused_mac`` holds every array for the whole call.
@njit(cache=True, nogil=True, _nrt=False)
def _fused_chunks(x, row_start, geometry, w, sums_from, kind, analytic, sampled, rng, raw, out, col_sums, tally,  # noqa: ANN001, C901, PLR0912, PLR0915
                  buffers):
    """``fused_mac``'s work, in the buffers ``_buffers`` made."""
    n_planes, slice_bits, n_groups, rpg, J, g0, g1, chunk, tile, block_rows, stages, first_chunk, chunk_step = geometry
    table, level_table, pulse_table, use_table, rowsum = sums_from
    scale, shift, noise, lut = analytic
    state, first_vector, words, item_bytes = rng
    n = x.shape[0]
    gs = g1 - g0
    n_blocks = (rpg + block_rows - 1) // block_rows
    n_tiles, n_patterns = table.shape[1], table.shape[3]
    noisy = kind == KIND_ANALYTIC and noise.size > 0 and item_bytes > 0
    items_per_vector = words * 8 // item_bytes if item_bytes else 0
    tile_pad = _padded(tile)
    table1 = table.reshape(-1)
    w1 = w.reshape(-1)
    out1 = out.reshape(-1)
    sums1 = col_sums.reshape(-1)
    n_chunks = (n + chunk - 1) // chunk
    x1 = x.reshape(-1)
    first = max(row_start, g0 * rpg)  # the request's rows on the spanned groups: xrow[dst ..] = x[b, first - row_start ..]
    n_copy = np.uint64(max(0, min(row_start + x.shape[1], g1 * rpg) - first))
    dst = np.uint64(first - g0 * rpg)
    words_all, pcg_lanes, pats_all, xrow, lane_cols, lane_f32, acc, i32, found, items_s = buffers
    ibuf, lanes, flags, codes = i32[0], i32[1], i32[2], i32[3]
    # each pair of a block reads its tile at lanes q * tile_pad ..: the lanes' columns (and scale and shift) per tile;
    # lanes past a narrower last tile hold column 0, which indexes the tables in range
    for t in range(lane_cols.shape[0]):
        for c0 in range(0, lane_cols.shape[1], tile_pad):
            for jj in range(min(tile, J - t * tile)):
                lane_cols[t, c0 + jj] = t * tile + jj
                if kind == KIND_ANALYTIC:
                    lane_f32[0, t, c0 + jj] = scale[t * tile + jj]
                    lane_f32[1, t, c0 + jj] = shift[t * tile + jj]
    items16 = words_all.view(np.uint16)  # with the padding past the chunk's words (see _buffers)
    items32 = words_all.view(np.uint32)
    for ci in range(first_chunk, n_chunks, chunk_step):
        b0 = ci * chunk
        nb = min(n, b0 + chunk) - b0
        words_buf = words_all[: nb * max(words, 1)].reshape((nb, max(words, 1)))
        if item_bytes > 0 and stages >= STAGE_ITEMS:
            _pcg_fill_lanes(words_buf.reshape(-1), state, (first_vector + b0) * words, pcg_lanes)
        pats1 = pats_all[: nb * n_planes * gs * n_blocks]
        for bb in range(nb):
            src = np.uint64((b0 + bb) * x.shape[1] + first - row_start)
            for r in range(n_copy):
                xrow[dst + r] = x1[src + r]
            level_sum, pulses = _vector_patterns(xrow, n_planes, slice_bits, rpg, block_rows, g0, use_table,
                                                 level_table, pulse_table, rowsum,
                                                 pats1[bb * n_planes * gs * n_blocks : (bb + 1) * n_planes * gs * n_blocks])
            tally[b0 + bb, 0] = level_sum
            tally[b0 + bb, 1] = pulses
        pair_count = nb * n_planes
        block = _block_pairs(pair_count, tile_pad)
        for gi in range(gs):
            g = g0 + gi
            for t0 in range(0, J, tile):
                tn = min(tile, J - t0)
                cols, sc, sh = lane_cols[t0 // tile], lane_f32[0, t0 // tile], lane_f32[1, t0 // tile]
                for q0 in range(0, pair_count, block):
                    nq = min(block, pair_count - q0)
                    m = nq * tile_pad
                    # 1. the tile's partial sums (exact integers)
                    if stages < STAGE_SUMS:
                        pass
                    elif use_table:
                        _sum_table_pairs(acc, tile_pad, table1, pats1, q0, nq, gs, gi,
                                         ((g * n_tiles + t0 // tile) * n_blocks) * n_patterns * tile,
                                         n_blocks, n_patterns * tile, tile, tn)
                    else:
                        for q in range(nq):
                            pat0 = ((q0 + q) * gs + gi) * n_blocks
                            a0 = q * tile_pad
                            for jj in range(tn):
                                acc[a0 + jj] = 0.0
                            for k in range(n_blocks):
                                pat = pats1[pat0 + k]
                                if pat != 0:
                                    v = np.float32(pat)
                                    r0 = (g * rpg + k) * J + t0
                                    for jj in range(tn):
                                        acc[a0 + jj] += v * w1[r0 + jj]
                    # 2. their codes
                    if kind == KIND_ANALYTIC:
                        _convert_analytic(acc, sc, sh, noisy, noise, lut, items16, q0, nq, n_planes, items_per_vector,
                                          (n_groups, g, J, t0), tile_pad, codes, stages)
                    elif stages >= STAGE_LOOKUP:
                        _block_items(items_s, items32, q0, nq, n_planes, items_per_vector,
                                     (n_groups, g, J, t0), tile_pad, tn)
                        _convert_sampled(acc, cols, J, items_s, sampled, ibuf, flags, lanes, found, codes, m)
                    # 3. out
                    if stages < STAGE_OUT:
                        continue
                    tu = np.uint64(tn)
                    for q in range(nq):
                        bb, p = divmod(q0 + q, n_planes)
                        c0 = np.uint64(q * tile_pad)
                        if raw:
                            o0 = np.uint64((((b0 + bb) * n_planes + p) * gs + gi) * J + t0)
                            for jj in range(tu):
                                out1[o0 + jj] = codes[c0 + jj]
                        else:
                            o0 = np.uint64((b0 + bb) * J + t0)
                            shift_p = p * slice_bits
                            for jj in range(tu):
                                sums1[o0 + jj] += np.int64(codes[c0 + jj]) << shift_p

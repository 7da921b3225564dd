"""Building blocks of the Numba masked-softmax kernel: scalar functions and LLVM intrinsics.

Everything here is written so that LLVM can vectorise a loop that calls it:
no libm calls, no branches that survive ``SimplifyCFG`` (only selects), and
no ``fptosi`` (whose out-of-range result is poison). The functions are plain
Python at import time; :func:`install` (called lazily by
:mod:`fastmask.kernels.numba_softmax`) imports Numba, builds the bit-cast
intrinsics and rebinds each function in this module's namespace to a Numba
dispatcher compiled with its own fast-math flag set. Importing this module
therefore neither imports nor compiles anything.

Contents
--------
- ``exp_f32(z)`` / ``exp_f64(z)``: ``exp`` for ``z <= 0`` (and ``-inf``/NaN):
  round ``z*log2(e)`` to an integer ``n`` with the add-a-magic-number trick,
  Cody-Waite reduction ``r = z - n*ln2_hi - n*ln2_lo``, a Taylor polynomial for
  ``exp(r)`` on ``|r| <= ln2/2`` (degree 7 / 13, Horner, fused by
  ``contract``), and ``2**n`` assembled from the integer bits of the rounded
  value. Results below the smallest normal number are exactly 0 (a select),
  so ``exp(-inf) == 0``; NaN propagates.
- ``half_to_f32_soft(h)`` / ``f32_to_half_soft(v)``: bit-exact IEEE
  binary16 <-> binary32 conversions (round to nearest even, subnormals, inf,
  NaN) in integer arithmetic, for float16 data passed as ``uint16``.
  ``half_to_f32`` / ``f32_to_half`` are the ones the kernel uses: LLVM
  ``fpext``/``fptrunc`` through ``half`` (one ``vcvtph2ps``/``vcvtps2ph`` per
  16 values with F16C) where the target has conversion instructions, the
  integer versions elsewhere. Both round to nearest even; they differ only in
  NaN payloads (the hardware quiets signalling NaNs).
- ``bf16_to_f32(b)`` / ``f32_to_bf16(v)``: bfloat16 <-> float32 for bfloat16
  data passed as ``int16`` (signed, so that its Numba type differs from
  float16's ``uint16``). bfloat16 is the top half of a float32, so the
  widening is a 16-bit shift, and the narrowing an integer round to nearest
  even on the dropped half: exactly what ``ml_dtypes`` computes, NaN to the
  quiet NaN of its sign (``0x7fc0``/``0xffc0``), values that round past the
  largest bfloat16 to inf, subnormals kept. Both are 32-bit integer IR (no
  float operation, no call), so loops over them vectorise on any target.
- ``fmaximum(a, b)``: ``llvm.maximum`` (NaN-propagating max), which the loop
  vectoriser turns into a vector reduction without needing ``nnan``.
- ``stream_line`` / ``stream_zero_line`` / ``store_fence``: non-temporal
  (cache-bypassing) stores of whole 64-byte lines of the output, so that a
  large output is written without first being read into the cache, and the
  fence that makes them visible; ``misalign(p)`` finds the line boundaries.
- ``lane_sum(p, n)``: the sum of ``p[0:n]`` (float32 or float64) in a fixed
  order that depends on ``n`` only: :data:`SUM_LANES` lanes over whole
  blocks, a masked last block, then a fixed pairwise tree. Emitted as
  explicit vector IR with no fast-math flags, so neither the vectoriser's
  choices (runtime alias checks, epilogues) nor the address of ``p`` can
  change the result.
- ``address(a, i)``: a typed pointer (``CPointer``) to ``a[i]`` of a 1-D
  array or pointer; ``prefetch(p, i, write)``: ``llvm.prefetch`` of the
  cache line holding ``p[i]`` (no effect on results).
- ``call_row_fn(addr, p, b, h, q, k0, n)``: call the C function at address
  ``addr`` as ``int64 f(T *p, int64 b, int64 h, int64 q, int64 k0, int64 n)``
  (``T`` is ``p``'s element type). The kernels reach user predicates and
  score functions this way: each is compiled once into such a row function
  (a Numba ``cfunc``) and the kernel, compiled once per dtype, calls it once
  per row.
- ``opaque(v)``: ``v``, hidden from the optimiser by an empty inline-asm
  statement. A masked max ``maximum(m, z if k else -inf)`` with a constant
  ``-inf`` is folded by InstCombine into ``k ? maximum(m, z) : m``, a
  conditional reduction the loop vectoriser does not handle; with an opaque
  ``-inf`` hoisted out of the loop the select stays put and the loop
  vectorises.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "BF16_QNAN",
    "EXP_FASTMATH",
    "HALF_FASTMATH",
    "address",
    "bf16_to_f32",
    "call_row_fn",
    "exp_f32",
    "exp_f64",
    "f32_to_bf16",
    "f32_to_half",
    "f32_to_half_soft",
    "fmaximum",
    "half_to_f32",
    "half_to_f32_soft",
    "install",
    "lane_sum",
    "misalign",
    "opaque",
    "prefetch",
    "store_fence",
    "stream_line",
    "stream_zero_line",
]

#: Fast-math flags of the ``exp`` functions. No ``reassoc`` (it would fold the
#: magic-number rounding ``(t + M) - M`` away), no ``nnan``/``ninf`` (the
#: kernel relies on ``-inf`` and NaN being honoured).
EXP_FASTMATH: frozenset[str] = frozenset({"nsz", "arcp", "contract", "afn"})
#: Fast-math flags of the float16 conversions: none, they are exact.
HALF_FASTMATH: frozenset[str] = frozenset()
#: Bits of the quiet NaN :func:`f32_to_bf16` makes of a positive NaN (``ml_dtypes``'
#: choice: payloads are dropped, the sign is kept).
BF16_QNAN = 0x7FC0
#: Lanes of :func:`lane_sum` per dtype name: 128 bytes, two 64-byte vectors
#: (independent add chains) with AVX-512, four with AVX2.
SUM_LANES: dict[str, int] = {"float32": 32, "float64": 16}

# --------------------------------------------------------------------------
# constants (numpy scalars: Numba freezes them with their own type)

_F32_LOG2E = np.float32(1.4426950408889634)
_F32_MAGIC = np.float32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer
_F32_LN2_HI = np.float32(0.693359375)  # 9 significant bits: n * hi is exact
_F32_LN2_LO = np.float32(-2.1219444005469057e-04)  # ln2 - hi
# exp(z) < 2**-126 (the smallest normal float32) below this: the result is 0.
_F32_EXP_MIN = np.float32(-87.33654475055310898657)  # -126 * ln2
_F32_ZERO = np.float32(0.0)
_F32_ONE = np.float32(1.0)
_F32_C2 = np.float32(1.0 / 2.0)
_F32_C3 = np.float32(1.0 / 6.0)
_F32_C4 = np.float32(1.0 / 24.0)
_F32_C5 = np.float32(1.0 / 120.0)
_F32_C6 = np.float32(1.0 / 720.0)
_F32_C7 = np.float32(1.0 / 5040.0)

_F64_LOG2E = np.float64(1.4426950408889634)
_F64_MAGIC = np.float64(6755399441055744.0)  # 1.5 * 2**52
_F64_LN2_HI = np.float64(6.93147180369123816490e-01)  # 32 significant bits
_F64_LN2_LO = np.float64(1.90821492927058770002e-10)
_F64_EXP_MIN = np.float64(-708.39641853226410622)  # -1022 * ln2
_F64_ZERO = np.float64(0.0)
_F64_ONE = np.float64(1.0)
_U64_52 = np.uint64(52)
_U64_ONE_BITS = np.uint64(0x3FF0000000000000)  # bits of 1.0
_F64_C = tuple(np.float64(1.0 / math.factorial(k)) for k in range(14))
(
    _F64_C0,
    _F64_C1,
    _F64_C2,
    _F64_C3,
    _F64_C4,
    _F64_C5,
    _F64_C6,
    _F64_C7,
    _F64_C8,
    _F64_C9,
    _F64_C10,
    _F64_C11,
    _F64_C12,
    _F64_C13,
) = _F64_C

_HALF_SUBNORMAL_BIAS = np.float32(6.103515625e-05)  # 2**-14
_HALF_ROUND_HALF = np.float32(0.5)


# --------------------------------------------------------------------------
# bit casts. Pure-Python stand-ins here (so that the scalar functions below
# can be stepped through without Numba); install() replaces them with
# Numba intrinsics that emit a single LLVM ``bitcast``.


def float_bits(v):
    """Bits of a float32 (as int32) or float64 (as int64)."""
    a = np.asarray(v)
    return a.view(np.int32 if a.dtype == np.float32 else np.int64)[()]


def f32_from_bits(i):
    """float32 whose bits are the low 32 bits of integer ``i``."""
    return np.asarray(int(i) & 0xFFFFFFFF, dtype=np.uint32).view(np.float32)[()]


def f64_from_bits(i):
    """float64 whose bits are the low 64 bits of integer ``i``."""
    return np.asarray(int(i) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64).view(np.float64)[()]


def opaque(v):
    """``v``, but unknown to the optimiser (an empty inline-asm statement)."""
    return v


def prefetch(p, i, write):
    """Hint that ``p[i]`` (``p`` a pointer) will be read (``write`` False) or written soon."""


def misalign(p):
    """Bytes by which pointer ``p`` lies past a 64-byte boundary."""


def stream_line(dst, j, src, k, scale):
    """Non-temporal store of one 64-byte line: ``dst[j + t] = src[k + t] * scale``.

    ``dst + j`` must be 64-byte aligned; ``t`` runs over the line (16 float32,
    8 float64, or 32 float16-as-uint16 or bfloat16-as-int16 elements);
    ``src`` holds the compute dtype (float16 is converted with the hardware,
    bfloat16 as :func:`f32_to_bf16` does; both round to nearest even).
    """


def stream_zero_line(dst, j):
    """Non-temporal store of zeros to the 64-byte-aligned line at ``dst + j``."""


def store_fence():
    """Order the non-temporal stores before anything that follows."""


def address(a, i):
    """Typed pointer to ``a[i]`` (``a`` a 1-D non-bool array, or a pointer).

    No bounds check and no reference: the caller keeps ``a`` alive. Indexing
    a pointer costs no wraparound check and no reference counting, which is
    what keeps the per-row overhead of the kernel small.
    """


def lane_sum(p, n):
    """Sum of ``p[0:n]`` (a float32/float64 pointer or array) in a fixed order.

    ``L = SUM_LANES[dtype]`` accumulators start at 0; lane ``l`` adds
    ``p[i + l]`` for each whole block ``i = 0, L, 2L, ...``, then the last
    ``n % L`` elements (lane ``l`` adds ``p[n - n % L + l]``, the others 0).
    The lanes are then added pairwise, ``acc[l] + acc[l + L/2]`` and so on
    down to one. All in the dtype of ``p``, no reassociation: the result
    depends only on ``n`` and the values, never on where ``p`` points.
    """
    a = np.asarray(p)[:n]
    lanes = SUM_LANES[a.dtype.name]
    acc = np.zeros(lanes, a.dtype)
    for i in range(0, n, lanes):
        blk = a[i : i + lanes]
        acc[: blk.size] += blk
    while acc.size > 1:
        acc = acc[: acc.size // 2] + acc[acc.size // 2 :]
    return acc[0]


def call_row_fn(addr, p, b, h, q, k0, n):
    """Call the row function at address ``addr`` (see the module docstring); returns its status."""


def fmaximum(a, b):
    """NaN-propagating maximum (``llvm.maximum``)."""
    if a != a or b != b:
        return a + b
    return a if a > b else b


# --------------------------------------------------------------------------
# exp for non-positive arguments


def exp_f32(z):
    """``exp(z)`` in float32 for ``z <= 0``; exactly 0 below ``log(2**-126)``."""
    t = z * _F32_LOG2E + _F32_MAGIC  # fused by `contract`; no reassoc: not folded
    n = t - _F32_MAGIC  # round(z * log2e), exact
    r = z - n * _F32_LN2_HI
    r = r - n * _F32_LN2_LO
    p = _F32_C7
    p = p * r + _F32_C6
    p = p * r + _F32_C5
    p = p * r + _F32_C4
    p = p * r + _F32_C3
    p = p * r + _F32_C2
    p = p * r + _F32_ONE
    p = p * r + _F32_ONE
    # bits(t) = bits(M) + n and bits(M) << 23 == 0 (mod 2**32): so the low 32
    # bits of bits(t) << 23 are n << 23, and adding the bias gives 2**n. (In
    # int64, sign-extended from 32 bits, neither op can overflow.)
    two_n = f32_from_bits((np.int64(float_bits(t)) << 23) + 0x3F800000)
    y = p * two_n
    return _F32_ZERO if z < _F32_EXP_MIN else y


def exp_f64(z):
    """``exp(z)`` in float64 for ``z <= 0``; exactly 0 below ``log(2**-1022)``."""
    t = z * _F64_LOG2E + _F64_MAGIC
    n = t - _F64_MAGIC
    r = z - n * _F64_LN2_HI
    r = r - n * _F64_LN2_LO
    p = _F64_C13
    p = p * r + _F64_C12
    p = p * r + _F64_C11
    p = p * r + _F64_C10
    p = p * r + _F64_C9
    p = p * r + _F64_C8
    p = p * r + _F64_C7
    p = p * r + _F64_C6
    p = p * r + _F64_C5
    p = p * r + _F64_C4
    p = p * r + _F64_C3
    p = p * r + _F64_C2
    p = p * r + _F64_ONE
    p = p * r + _F64_ONE
    # bits(M) << 52 == 0 (mod 2**64): the low 64 bits are n << 52. Unsigned
    # arithmetic: Numba's signed adds carry `nsw`, and for NaN/inf inputs an
    # overflow there would be poison rather than an ignored value.
    two_n = f64_from_bits((np.uint64(float_bits(t)) << _U64_52) + _U64_ONE_BITS)
    y = p * two_n
    return _F64_ZERO if z < _F64_EXP_MIN else y


# --------------------------------------------------------------------------
# binary16 <-> binary32


def half_to_f32_soft(h):
    """float32 value of the binary16 number whose bits are ``h`` (exact)."""
    hv = np.int64(h)
    mag = (hv & 0x7FFF) << 13  # exponent and mantissa moved to float32 places
    exp_field = mag & 0x0F800000
    normal = mag + 0x38000000  # re-bias the exponent: + (127 - 15) << 23
    special = normal + 0x38000000  # inf/NaN: exponent field all ones
    # subnormal (and zero): 2**-14 * (1 + m/1024) - 2**-14 == m * 2**-24, exact
    sub = float_bits(f32_from_bits(normal + 0x00800000) - _HALF_SUBNORMAL_BIAS)
    bits = normal
    bits = special if exp_field == 0x0F800000 else bits
    bits = np.int64(sub) if exp_field == 0 else bits
    return f32_from_bits(bits | ((hv & 0x8000) << 16))


def f32_to_half_soft(v):
    """binary16 bits (uint16) of the float32 ``v``, rounded to nearest even."""
    fb = np.int64(float_bits(v))
    sign = (fb >> 16) & 0x8000
    mag = fb & 0x7FFFFFFF
    # normal range: drop 13 mantissa bits with round-half-to-even; a carry
    # into the exponent is correct (it reaches 0x7C00 = inf above 65504).
    normal = (mag - 0x37FFF001 + ((mag >> 13) & 1)) >> 13  # 0x37FFF001 = (112 << 23) - 0xFFF
    # below 2**-14: |v| + 0.5 puts the half-subnormal grid (2**-24) on the
    # float32 ulp of 0.5, so the FPU rounds to nearest even for us.
    sub = np.int64(float_bits(f32_from_bits(mag) + _HALF_ROUND_HALF)) - 0x3F000000
    h = normal
    h = sub if mag < 0x38800000 else h
    h = 0x7C00 if mag >= 0x47800000 else h  # |v| >= 65536 or inf
    h = (0x7E00 | ((mag >> 13) & 0x3FF)) if mag > 0x7F800000 else h  # quiet NaN
    return np.uint16(h | sign)


def half_to_f32(h):
    """float32 value of the binary16 bits ``h``: hardware or ``half_to_f32_soft``."""
    return half_to_f32_soft(h)


def f32_to_half(v):
    """binary16 bits of float32 ``v`` (RNE): hardware or ``f32_to_half_soft``."""
    return f32_to_half_soft(v)


# --------------------------------------------------------------------------
# bfloat16 <-> binary32. The definitions, in integer arithmetic; install()
# replaces them with intrinsics that emit these operations on 32-bit
# integers (the same emitter serves stream_line's vector conversion).


def bf16_to_f32(b):
    """float32 value of the bfloat16 bits ``b`` (an int16): they are its top 16 bits (exact)."""
    return f32_from_bits(np.int64(b) << 16)


def f32_to_bf16(v):
    """bfloat16 bits (int16) of the float32 ``v``, rounded to nearest even, as ``ml_dtypes``.

    Adding ``0x7fff`` plus the lowest kept bit to the bits rounds the dropped
    half to nearest even; a carry into the exponent is right, also from the
    largest finite values to inf. NaN would carry into the sign, so it is
    replaced by the quiet NaN of its sign.
    """
    fb = np.int64(float_bits(v))  # sign-extended: the shifts below keep the sign
    r = (fb + 0x7FFF + ((fb >> 16) & 1)) >> 16
    nan = ((fb >> 16) & -0x8000) | BF16_QNAN
    return np.int16(nan if (fb & 0x7FFFFFFF) > 0x7F800000 else r)


#: After :func:`install`: whether ``half_to_f32``/``f32_to_half`` use the
#: target's conversion instructions (x86 F16C, AArch64) rather than the
#: integer versions.
HALF_HARDWARE = False


def _target_has_half_conversions() -> bool:
    """Whether LLVM lowers fpext/fptrunc to/from half inline for Numba's target."""
    import llvmlite.binding as llb
    from numba.core import config

    triple = llb.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    if triple.startswith(("x86_64", "i386", "i686")):
        feats = config.CPU_FEATURES
        if feats is None:
            feats = llb.get_host_cpu_features().flatten()
        return "+f16c" in feats.split(",")
    return False  # elsewhere LLVM may call compiler-rt, which Numba's JIT may lack


# --------------------------------------------------------------------------
# lazy Numba installation

_installed = False


def _make_intrinsics():
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def float_bits_(typingctx, v):
        if v == types.float32:
            rt = types.int32
        elif v == types.float64:
            rt = types.int64
        else:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(rt))

        return rt(v), codegen

    def _from_bits(ft, it, width):
        @intrinsic
        def from_bits(typingctx, i):
            if not isinstance(i, types.Integer):
                return None

            def codegen(context, builder, signature, args):
                v = args[0]
                iw = ir.IntType(width)
                if i.bitwidth > width:
                    v = builder.trunc(v, iw)
                elif i.bitwidth < width:
                    v = builder.sext(v, iw) if i.signed else builder.zext(v, iw)
                return builder.bitcast(v, context.get_value_type(ft))

            return ft(i), codegen

        return from_bits

    @intrinsic
    def fmaximum_(typingctx, a, b):
        if not (isinstance(a, types.Float) and a == b and a.bitwidth in (32, 64)):
            return None

        def codegen(context, builder, signature, args):
            lty = context.get_value_type(a)
            fnty = ir.FunctionType(lty, [lty, lty])
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.maximum.f{a.bitwidth}")
            return builder.call(fn, list(args))

        return a(a, b), codegen

    @intrinsic
    def opaque_(typingctx, v):
        if not (isinstance(v, types.Float) and v.bitwidth in (32, 64)):
            return None

        def codegen(context, builder, signature, args):
            # through a general-purpose register: "r" exists on every target
            it = ir.IntType(v.bitwidth)
            bits = builder.bitcast(args[0], it)
            out = builder.asm(ir.FunctionType(it, [it]), "", "=r,0", [bits], side_effect=False)
            return builder.bitcast(out, context.get_value_type(v))

        return v(v), codegen

    @intrinsic
    def address_(typingctx, a, i):
        if not isinstance(i, types.Integer):
            return None
        if isinstance(a, types.Array) and a.ndim == 1 and a.dtype != types.boolean:
            rt = types.CPointer(a.dtype)
        elif isinstance(a, types.CPointer):
            rt = a
        else:
            return None

        def codegen(context, builder, signature, args):
            if isinstance(a, types.Array):
                base = context.make_array(a)(context, builder, value=args[0]).data
            else:
                base = args[0]
            idx = context.cast(builder, args[1], i, types.intp)
            return builder.gep(base, [idx])

        return rt(a, i), codegen

    @intrinsic
    def prefetch_(typingctx, p, i, write):
        if not (
            isinstance(p, types.CPointer)
            and isinstance(i, types.Integer)
            and isinstance(write, types.BooleanLiteral)
        ):
            return None
        rw = 1 if write.literal_value else 0

        def codegen(context, builder, signature, args):
            idx = context.cast(builder, args[1], i, types.intp)
            ptr = builder.gep(args[0], [idx])
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            # (address, rw, locality 3 = keep in all levels, cache type 1 = data)
            builder.call(fn, [builder.bitcast(ptr, i8p), i32(rw), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.none(p, i, write), codegen

    @intrinsic
    def call_row_fn_(typingctx, addr, p, b, h, q, k0, n):
        ints = (addr, b, h, q, k0, n)
        if not (isinstance(p, types.CPointer) and all(isinstance(t, types.Integer) for t in ints)):
            return None

        def codegen(context, builder, signature, args):
            i64 = ir.IntType(64)
            fnty = ir.FunctionType(i64, [context.get_value_type(p)] + [i64] * 5)
            int_args = (args[0], *args[2:])
            vals = [
                context.cast(builder, v, t, types.int64)
                for v, t in zip(int_args, ints, strict=True)
            ]
            fptr = builder.inttoptr(vals[0], fnty.as_pointer())
            return builder.call(fptr, [args[1], *vals[1:]])

        return types.int64(addr, p, b, h, q, k0, n), codegen

    @intrinsic
    def misalign_(typingctx, p):
        if not isinstance(p, types.CPointer):
            return None

        def codegen(context, builder, signature, args):
            addr = builder.ptrtoint(args[0], context.get_value_type(types.intp))
            return builder.and_(addr, addr.type(63))

        return types.intp(p), codegen

    def splat32(like, value):
        """i32 constant ``value``, or its splat when ``like`` is a vector."""
        i32 = ir.IntType(32)
        if isinstance(like, ir.VectorType):
            return ir.Constant(ir.VectorType(i32, like.count), [value] * like.count)
        return ir.Constant(i32, value)

    def int_type(like, width):
        it = ir.IntType(width)
        return ir.VectorType(it, like.count) if isinstance(like, ir.VectorType) else it

    def emit_bf16_to_f32(builder, b):
        """``b`` (i16 or a vector of them) widened to float32: the bits shifted up by 16."""
        i32t = int_type(b.type, 32)
        wide = builder.shl(builder.zext(b, i32t), splat32(b.type, 16))
        ft = ir.FloatType()
        if isinstance(b.type, ir.VectorType):
            ft = ir.VectorType(ft, b.type.count)
        return builder.bitcast(wide, ft)

    def emit_f32_to_bf16(builder, v):
        """float32 ``v`` (or a vector) to bfloat16 bits as :func:`f32_to_bf16` defines it.

        Unsigned 32-bit adds without ``nuw``/``nsw``: only a NaN's bits can wrap,
        and that lane is replaced by the select.
        """
        i32t = int_type(v.type, 32)
        bits = builder.bitcast(v, i32t)

        def c(value):
            return splat32(v.type, value)

        hi = builder.lshr(bits, c(16))
        rnd = builder.add(builder.add(bits, c(0x7FFF)), builder.and_(hi, c(1)))
        rounded = builder.lshr(rnd, c(16))
        nan = builder.or_(builder.and_(hi, c(0x8000)), c(BF16_QNAN))
        is_nan = builder.icmp_unsigned(">", builder.and_(bits, c(0x7FFFFFFF)), c(0x7F800000))
        return builder.trunc(builder.select(is_nan, nan, rounded), int_type(v.type, 16))

    def line_type(t):
        """(LLVM vector type of one 64-byte line of numba type ``t``, lanes)."""
        if t == types.float32:
            return ir.VectorType(ir.FloatType(), 16), 16
        if t == types.float64:
            return ir.VectorType(ir.DoubleType(), 8), 8
        if t in (types.uint16, types.int16):
            return ir.VectorType(ir.IntType(16), 32), 32
        return None, 0

    def nt_store(builder, vec, ptr):
        vptr = builder.bitcast(ptr, vec.type.as_pointer())
        st = builder.store(vec, vptr, align=64)
        st.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))

    @intrinsic
    def stream_line_(typingctx, dst, j, src, k, scale):
        if not (isinstance(dst, types.CPointer) and isinstance(src, types.CPointer)):
            return None
        lty, lanes = line_type(dst.dtype)
        ct = src.dtype
        ok = (dst.dtype == ct and ct in (types.float32, types.float64)) or (
            dst.dtype in (types.uint16, types.int16) and ct == types.float32
        )
        if lty is None or not ok or scale != ct:
            return None

        def codegen(context, builder, signature, args):
            dp, jv, sp, kv, sv = args
            intp = context.get_value_type(types.intp)
            jv = context.cast(builder, jv, j, types.intp)
            kv = context.cast(builder, kv, k, types.intp)
            cty = context.get_value_type(ct)
            vty = ir.VectorType(cty, lanes)
            src_ptr = builder.bitcast(builder.gep(sp, [kv]), vty.as_pointer())
            v = builder.load(src_ptr, align=ct.bitwidth // 8)
            splat = builder.insert_element(ir.Constant(vty, ir.Undefined), sv, intp(0))
            splat = builder.shuffle_vector(
                splat,
                ir.Constant(vty, ir.Undefined),
                ir.Constant(ir.VectorType(ir.IntType(32), lanes), None),
            )
            v = builder.fmul(v, splat)
            if dst.dtype == types.uint16:
                v = builder.fptrunc(v, ir.VectorType(ir.HalfType(), lanes))
                v = builder.bitcast(v, lty)
            elif dst.dtype == types.int16:
                v = emit_f32_to_bf16(builder, v)
            nt_store(builder, v, builder.gep(dp, [jv]))
            return context.get_dummy_value()

        return types.none(dst, j, src, k, scale), codegen

    @intrinsic
    def lane_sum_(typingctx, p, n):
        if not (
            isinstance(p, types.CPointer)
            and p.dtype in (types.float32, types.float64)
            and isinstance(n, types.Integer)
        ):
            return None
        ft = p.dtype
        lanes = SUM_LANES[str(ft)]

        def codegen(context, builder, signature, args):
            # Explicit vector IR. The adds carry only `contract` (meaningless for a
            # lone fadd): Numba's fast-math pass adds its flags (reassoc) to float
            # ops that have none, and with reassoc LLVM could reorder the sum.
            pp, nv = args

            def fadd(a, b):
                return builder.fadd(a, b, flags=("contract",))

            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            nv = context.cast(builder, nv, n, types.intp)
            cty = context.get_value_type(ft)
            vty = ir.VectorType(cty, lanes)
            align = ft.bitwidth // 8
            zero = ir.Constant(vty, None)
            acc = cgutils.alloca_once_value(builder, zero)  # mem2reg makes it a phi
            nfull = builder.and_(nv, intp(-lanes))
            with cgutils.for_range_slice(builder, intp(0), nfull, intp(lanes)) as (i, _):
                v = builder.load(
                    builder.bitcast(builder.gep(pp, [i]), vty.as_pointer()), align=align
                )
                builder.store(fadd(builder.load(acc), v), acc)
            rem = builder.sub(nv, nfull)
            with builder.if_then(builder.icmp_signed(">", rem, intp(0))):
                # lanes l < rem of the last block; the others are not read
                ity = ir.VectorType(intp, lanes)
                idx = ir.Constant(ity, [intp(k) for k in range(lanes)])
                splat = builder.insert_element(ir.Constant(ity, ir.Undefined), rem, i32(0))
                splat = builder.shuffle_vector(
                    splat,
                    ir.Constant(ity, ir.Undefined),
                    ir.Constant(ir.VectorType(i32, lanes), None),
                )
                mask = builder.icmp_signed("<", idx, splat)
                vptr = builder.bitcast(builder.gep(pp, [nfull]), vty.as_pointer())
                suffix = f"v{lanes}f{ft.bitwidth}"
                fnty = ir.FunctionType(vty, [vptr.type, i32, mask.type, vty])
                fn = cgutils.get_or_insert_function(
                    builder.module, fnty, f"llvm.masked.load.{suffix}.p0"
                )
                v = builder.call(fn, [vptr, i32(align), mask, zero])
                builder.store(fadd(builder.load(acc), v), acc)
            a = builder.load(acc)
            width = lanes
            while width > 1:  # fixed pairwise tree: lanes l and l + width/2
                half = width // 2
                undef = ir.Constant(ir.VectorType(cty, width), ir.Undefined)
                lo = builder.shuffle_vector(
                    a, undef, ir.Constant(ir.VectorType(i32, half), list(range(half)))
                )
                hi = builder.shuffle_vector(
                    a, undef, ir.Constant(ir.VectorType(i32, half), list(range(half, width)))
                )
                a = fadd(lo, hi)
                width = half
            return builder.extract_element(a, i32(0))

        return ft(p, n), codegen

    @intrinsic
    def stream_zero_line_(typingctx, dst, j):
        if not isinstance(dst, types.CPointer):
            return None
        lty, _ = line_type(dst.dtype)
        if lty is None:
            return None

        def codegen(context, builder, signature, args):
            jv = context.cast(builder, args[1], j, types.intp)
            nt_store(builder, ir.Constant(lty, None), builder.gep(args[0], [jv]))
            return context.get_dummy_value()

        return types.none(dst, j), codegen

    @intrinsic
    def store_fence_(typingctx):
        def codegen(context, builder, signature, args):
            builder.fence("seq_cst")
            return context.get_dummy_value()

        return types.none(), codegen

    @intrinsic
    def half_to_f32_hw(typingctx, h):
        if h != types.uint16:
            return None

        def codegen(context, builder, signature, args):
            v = builder.bitcast(args[0], ir.HalfType())
            return builder.fpext(v, ir.FloatType())

        return types.float32(h), codegen

    @intrinsic
    def f32_to_half_hw(typingctx, v):
        if v != types.float32:
            return None

        def codegen(context, builder, signature, args):
            h = builder.fptrunc(args[0], ir.HalfType())  # round to nearest even
            return builder.bitcast(h, ir.IntType(16))

        return types.uint16(v), codegen

    @intrinsic
    def bf16_to_f32_(typingctx, b):
        if b != types.int16:
            return None

        def codegen(context, builder, signature, args):
            return emit_bf16_to_f32(builder, args[0])

        return types.float32(b), codegen

    @intrinsic
    def f32_to_bf16_(typingctx, v):
        if v != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return emit_f32_to_bf16(builder, args[0])

        return types.int16(v), codegen

    return {
        "bf16_to_f32": bf16_to_f32_,
        "f32_to_bf16": f32_to_bf16_,
        "half_to_f32_hw": half_to_f32_hw,
        "f32_to_half_hw": f32_to_half_hw,
        "prefetch": prefetch_,
        "address": address_,
        "call_row_fn": call_row_fn_,
        "misalign": misalign_,
        "stream_line": stream_line_,
        "stream_zero_line": stream_zero_line_,
        "store_fence": store_fence_,
        "lane_sum": lane_sum_,
        "opaque": opaque_,
        "float_bits": float_bits_,
        "f32_from_bits": _from_bits(types.float32, types.int32, 32),
        "f64_from_bits": _from_bits(types.float64, types.int64, 64),
        "fmaximum": fmaximum_,
    }


def install() -> None:
    """Import Numba and rebind this module's functions to Numba objects (once).

    The caller holds a lock (``numba_softmax._install``). After this,
    ``exp_f32`` etc. are Numba dispatchers usable from jitted code and from
    Python; they are not cached on disk themselves (the kernels that inline
    them are).
    """
    global _installed
    if _installed:
        return
    import numba

    global HALF_HARDWARE
    g = globals()
    intrinsics = _make_intrinsics()
    hw = {
        "half_to_f32": intrinsics.pop("half_to_f32_hw"),
        "f32_to_half": intrinsics.pop("f32_to_half_hw"),
    }
    g.update(intrinsics)
    for name in ("exp_f32", "exp_f64"):
        g[name] = numba.njit(fastmath=set(EXP_FASTMATH))(g[name])
    for name in ("half_to_f32_soft", "f32_to_half_soft"):
        g[name] = numba.njit(fastmath=set(HALF_FASTMATH))(g[name])
    HALF_HARDWARE = _target_has_half_conversions()
    for name in ("half_to_f32", "f32_to_half"):
        g[name] = hw[name] if HALF_HARDWARE else g[name + "_soft"]
    _installed = True

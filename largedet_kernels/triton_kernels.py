"""The Triton kernels: PMD-LAMB over every tensor of a bucket in two launches (three for a tensor of many chunks).

NOTE [two passes]
    The trust ratio ‖x‖/‖u‖ needs a whole-tensor reduction before any element
    of x may change, so a step is two launches over the same chunk table:

    pass 1 (``pmd_lamb_moments_kernel``): read x, g, m, v; write m, v; write
        per-chunk partial sums of x² and u² (a small buffer, no atomics, so
        the norms are deterministic).
    pass 2 (``pmd_lamb_update_kernel``): sum the partials of the chunk's tensor
        in a fixed order, form the trust ratio, read x, m, v, recompute u
        (bitwise the same u as pass 1: same function, same inputs) and write x.

    With fp32 masters (NOTE [master weights] in largedet_kernels/optimizer.py)
    x is the master in both passes: pass 1 does not read the parameter, pass 2
    writes the master and the parameter (the master rounded to nearest). Moments
    stored in bf16 are rounded before pass 1 forms u from them, so that both
    passes form u from the same, stored, values.

    fp32 traffic: 16 + 8 B/elem in pass 1, 12 + 4 B/elem in pass 2, 40 in all;
    storing u instead would cost 8 more and the memory to hold it. bf16
    parameters with fp32 gradients and masters: pass 1 reads master 4 + g 4 +
    m 4 + v 4 and writes m, v 8; pass 2 reads master, m, v 12 and writes
    master 4 + x 2: 42 in all (30 with bf16 moments).

    Each program of pass 2 sums every partial of its tensor, n² loads for a
    tensor of n chunks: cheap up to ChunkPlan.MAX_CHUNKS_SUMMED_IN_PASS_2, where
    it saves a launch. A plan with a larger tensor (decided when the host builds
    it) runs ``tensor_sums_kernel`` between the passes instead and pass 2 reads
    one reduced pair per tensor, as under NOTE [sharded norms]; ``_tensor_sums``
    sums in the same order either way, so the bits agree.

Pointer tables (NOTE [pointer tables] in largedet_kernels/backends/chunk_plan.py)
    Each program handles CHUNK elements of one tensor, found through int64
    address tables on the device; offsets are int64.

The vector and scalar paths (NOTE [vector and scalar paths] in csrc/multi_tensor_apply.cuh)
    Each program tests the addresses of the streams it moves of its own tensor:
    when all are 16-byte aligned it walks the chunk with pointers hinted
    ``tl.multiple_of(·, 16)``, whose full (unmasked) tiles compile to 128-bit
    accesses; else it takes the same walk unhinted. So one misaligned tensor (a
    gradient viewing a DDP bucket) leaves the others of its bucket vectorised.
    Chunks start at multiples of CHUNK: whole tiles of an aligned tensor stay aligned.

Sharded norms (NOTE [sharded norms] in largedet_kernels/sharding.py)
    Shards of a tensor take three launches: pass 1, ``tensor_sums_kernel`` (each
    tensor's local Σx², Σu²), then, after the caller's all-reduce, pass 2 reading
    one reduced pair per tensor: the launches of an unsharded step of a plan that
    reduces between its passes (NOTE [two passes]), which so get the same bits.

NOTE [skipped steps]
    With GradScaler's ``found_inf`` non-zero every store is masked off and t
    does not advance, so params, masters, moments and steps stay bit-identical.

NOTE [bf16 bits]
    A bf16 store rounds to nearest, ties to even, as torch's ``.to(torch.bfloat16)``
    does. Compiled, that is Triton's own ``.to(tl.bfloat16)``: the GPU's
    ``cvt.rn.bf16.f32``, which makes a NaN 0x7FFF, as the CUDA kernels'
    ``__float2bfloat16_rn`` does. Triton's interpreter, which CI tests, truncates
    that cast, so there (INTERPRETED) the rounding is spelt in integers: the
    float32 bits plus an addend, the low 16 dropped. The addend 0x7FFF, plus 1
    when the kept bits are odd, rounds to nearest even; a NaN becomes
    csrc/rounding.h's quiet NaN 0x7FC0 (torch's CPU makes 0xFFFF). Stochastic
    rounding is that integer sum everywhere, with a 16-bit dither as the addend
    (NOTE [stochastic rounding] in largedet_kernels/rounding.py): a bf16
    parameter without a master whose hyper row asks for it.

Double coefficients (NOTE [double coefficients] in largedet_kernels/backends/tables.py)
    The hyper-parameter table is fp64; ξ, ξβ and the bias corrections are
    formed from it in fp64 once per program and rounded to the math type once.
"""

import triton
import triton.language as tl

# Whether triton.jit below makes interpreted functions, whose bf16 casts truncate (NOTE [bf16 bits]).
INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)

# Columns of the per-tensor hyper-parameter table (fp64): tables.HYPER_COLUMNS, in order.
LR_ALPHA = tl.constexpr(0)  # η·α
BETA1 = tl.constexpr(1)
BETA2 = tl.constexpr(2)
WEIGHT_G = tl.constexpr(3)  # the weight of g in m: 1−β1, or 1 without grad averaging
WEIGHT_G2 = tl.constexpr(4)  # the weight of g² in v: 1−β2
EPS = tl.constexpr(5)
WEIGHT_DECAY = tl.constexpr(6)
CYCLE = tl.constexpr(7)  # T, 0 for no cycle (ξ ≡ 1)
BIAS_CORRECTION = tl.constexpr(8)  # flags are 0.0 / 1.0
EPS_INSIDE_SQRT = tl.constexpr(9)
ADAM_W_MODE = tl.constexpr(10)
USE_TRUST_RATIO = tl.constexpr(11)
STOCHASTIC_ROUNDING = tl.constexpr(12)  # bf16 parameters without masters (NOTE [bf16 bits])
SEED = tl.constexpr(13)  # an integer below 2**32
MAXIMIZE = tl.constexpr(14)  # gradient ascent: weight_g and λ in g negated, as in csrc/pmd_lamb_math.h
TRUST_RATIO_MIN = tl.constexpr(15)  # the bounds of ‖x‖/‖u‖: 0 and +inf when unbounded
TRUST_RATIO_MAX = tl.constexpr(16)
N_HYPER = tl.constexpr(17)

HALF_PI = tl.constexpr(1.5707963267948966)

# Fields of a trust-ratio record, as tables.py's RECORD_FIELDS (NOTE [trust-ratio records] there).
RECORD_STEP = tl.constexpr(0)
RECORD_X_NORM = tl.constexpr(1)
RECORD_U_NORM = tl.constexpr(2)
RECORD_RATIO = tl.constexpr(3)
N_RECORD = tl.constexpr(4)

# Rows of the pointer table (NOTE [pointer tables]).
X = tl.constexpr(0)
G = tl.constexpr(1)
M = tl.constexpr(2)
V = tl.constexpr(3)
STEP = tl.constexpr(4)
MASTER = tl.constexpr(5)  # 0 in a bucket without masters

MASTER_DTYPE = tl.constexpr(tl.float32)  # of every master, whatever its parameter's dtype

VECTOR_BYTES = tl.constexpr(16)  # one 128-bit access (NOTE [vector and scalar paths])


@triton.jit
def _step_coefficients(hyper, tensor, t, MATH: tl.constexpr):
    """What the update needs of tensor's hyper-parameters at step t (ξ, corrections, ...), formed
    in fp64 and rounded to MATH once (NOTE [double coefficients])."""
    row = hyper + tensor * N_HYPER
    beta1 = tl.load(row + BETA1)
    beta2 = tl.load(row + BETA2)
    eps = tl.load(row + EPS)
    weight_decay = tl.load(row + WEIGHT_DECAY)
    cycle = tl.load(row + CYCLE)
    bias_correction = tl.load(row + BIAS_CORRECTION) != 0
    eps_inside = tl.load(row + EPS_INSIDE_SQRT) != 0
    adam_w = tl.load(row + ADAM_W_MODE) != 0
    sign = tl.where(tl.load(row + MAXIMIZE) != 0, -1.0, 1.0)

    t64 = t.to(tl.float64)
    period = tl.where(cycle > 0, cycle, 1.0)
    xi = tl.where(cycle > 0, tl.cos((t64 % period) / period * HALF_PI), 1.0)
    decay_m = (xi * beta1).to(MATH)
    decay_v = (xi * beta2).to(MATH)
    weight_g = (sign * tl.load(row + WEIGHT_G)).to(MATH)
    weight_g2 = tl.load(row + WEIGHT_G2).to(MATH)
    # β^t = 2^(t·log2 β); β = 0 gives 2^-inf = 0.
    correction_m = tl.where(bias_correction, 1.0 - tl.exp2(t64 * tl.log2(beta1)), 1.0).to(MATH)
    correction_v = tl.where(bias_correction, 1.0 - tl.exp2(t64 * tl.log2(beta2)), 1.0).to(MATH)
    eps_in = tl.where(eps_inside, eps, 0.0).to(MATH)
    eps_out = tl.where(eps_inside, 0.0, eps).to(MATH)
    decay_in_grad = tl.where(adam_w, 0.0, sign * weight_decay).to(MATH)
    decay_in_update = tl.where(adam_w, weight_decay, 0.0).to(MATH)
    return (decay_m, decay_v, weight_g, weight_g2, correction_m, correction_v,
            eps_in, eps_out, decay_in_grad, decay_in_update)  # fmt: skip


@triton.jit
def _div(a, b, MATH: tl.constexpr):
    # Correctly rounded: Triton's fp32 "/" is approximate (fp64 "/" already rounds correctly).
    if MATH == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _sqrt(a, MATH: tl.constexpr):
    if MATH == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def _direction(m, v, x, correction_m, correction_v, eps_in, eps_out, decay_in_update, MATH: tl.constexpr):
    """u = r + λx with r = m̂/√(v̂ + ε) or m̂/(√v̂ + ε): the one place both passes get u from."""
    denom = _sqrt(_div(v, correction_v, MATH) + eps_in, MATH) + eps_out
    return _div(_div(m, correction_m, MATH), denom, MATH) + decay_in_update * x


@triton.jit
def _load(ptr, mask, TAIL: tl.constexpr, EVICT: tl.constexpr):
    # Full tiles load without a mask so that loads vectorise (NOTE [vector and scalar paths]).
    if TAIL:
        return tl.load(ptr, mask=mask, other=0.0, eviction_policy=EVICT)
    else:
        return tl.load(ptr, eviction_policy=EVICT)


@triton.jit
def _store_mask(mask, keep, TAIL: tl.constexpr):
    """keep, and on the tail also mask (spelt with where: Triton 3.8's interpreter rejects & here)."""
    if TAIL:
        return tl.where(keep, mask, False)
    else:
        return keep


@triton.jit
def _chunk(chunk, chunk_tensor, chunk_index, numels, CHUNK: tl.constexpr):
    """The tensor of this program's chunk, the chunk's first element (int64) and its length."""
    tensor = tl.load(chunk_tensor + chunk)
    start = tl.load(chunk_index + chunk).to(tl.int64) * CHUNK
    return tensor, start, tl.minimum(tl.load(numels + tensor) - start, CHUNK)


@triton.jit
def _tensor_addresses(ptrs, n_tensors, tensor, HAS_MASTER: tl.constexpr):
    """The int64 addresses of tensor's parameter, x, g, m, v (NOTE [pointer tables]), and a pointer to its step.
    x is what the math reads (and pass 2 writes): the fp32 master in a bucket with masters, else the parameter."""
    param = tl.load(ptrs + X * n_tensors + tensor)
    x = param
    if HAS_MASTER:
        x = tl.load(ptrs + MASTER * n_tensors + tensor)
    g = tl.load(ptrs + G * n_tensors + tensor)
    m = tl.load(ptrs + M * n_tensors + tensor)
    v = tl.load(ptrs + V * n_tensors + tensor)
    step = tl.load(ptrs + STEP * n_tensors + tensor).to(tl.pointer_type(tl.float32))
    return param, x, g, m, v, step


@triton.jit
def _aligned(address):
    return address % VECTOR_BYTES == 0


@triton.jit
def _pointer(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """address as a pointer to DTYPE, hinted aligned on the vector path (NOTE [vector and scalar paths])."""
    ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, VECTOR_BYTES)
    return ptr


@triton.jit
def _mix32(x):
    """rounding.py's mix32 on uint32 values: the products wrap."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x1B873593
    return x ^ (x >> 16)


@triton.jit
def _bf16(bits, addend):
    """fp32 bits as bf16: bits + addend, the low 16 dropped; a NaN becomes the quiet NaN (NOTE [bf16 bits])."""
    kept = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (bits + addend) >> 16)
    return kept.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nearest(bits):
    """The addend that rounds fp32 bits to the nearest bf16, ties to even."""
    return 0x7FFF + ((bits >> 16) & 1)


@triton.jit
def _rounded(y, DTYPE: tl.constexpr):
    """y stored as DTYPE, rounded to nearest (NOTE [bf16 bits])."""
    if INTERPRETED and DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        return _bf16(bits, _nearest(bits))
    else:
        return y.to(DTYPE)


@triton.jit
def _rounding_key(hyper, tensor, t, STOCHASTIC: tl.constexpr):
    """Whether tensor's parameter rounds stochastically, and the key of step t: mix32(mix32(seed) ^ t)
    (NOTE [stochastic rounding] in largedet_kernels/rounding.py)."""
    if STOCHASTIC:
        row = hyper + tensor * N_HYPER
        seed = tl.load(row + SEED).to(tl.uint32)
        return tl.load(row + STOCHASTIC_ROUNDING) != 0, _mix32(_mix32(seed) ^ t.to(tl.uint32))
    else:
        return False, 0


@triton.jit
def _parameter_value(y, index, stochastic, key, X_DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """y as the parameter stores it: rounded to nearest, or, where stochastic, with the dither of element index
    (int64, its position in the tensor) under the step's key (NOTE [bf16 bits])."""
    if STOCHASTIC:
        dither = _mix32(_mix32(index.to(tl.uint32) ^ key) ^ (index >> 32).to(tl.uint32)) >> 16
        return tl.where(stochastic, _bf16(y.to(tl.uint32, bitcast=True), dither), _rounded(y, X_DTYPE))
    else:
        return _rounded(y, X_DTYPE)


@triton.jit
def _moments_tile(x_ptr, g_ptr, m_ptr, v_ptr, offs, mask, keep, factor, acc_x, acc_u,
                  decay_m, decay_v, weight_g, weight_g2, correction_m, correction_v,
                  eps_in, eps_out, decay_in_grad, decay_in_update,
                  M_DTYPE: tl.constexpr, MATH: tl.constexpr, TAIL: tl.constexpr):  # fmt: skip
    x = _load(x_ptr + offs, mask, TAIL, "").to(MATH)
    g = _load(g_ptr + offs, mask, TAIL, "evict_first").to(MATH)  # read once: don't keep it in L2
    m = _load(m_ptr + offs, mask, TAIL, "").to(MATH)
    v = _load(v_ptr + offs, mask, TAIL, "").to(MATH)
    g = g * factor + decay_in_grad * x
    m = _rounded(decay_m * m + weight_g * g, M_DTYPE)
    v = _rounded(decay_v * v + weight_g2 * g * g, M_DTYPE)
    store_mask = _store_mask(mask, keep, TAIL)
    tl.store(m_ptr + offs, m, mask=store_mask)
    tl.store(v_ptr + offs, v, mask=store_mask)
    # u of the moments as stored, which pass 2 reads back (NOTE [two passes]).
    u = _direction(m.to(MATH), v.to(MATH), x, correction_m, correction_v, eps_in, eps_out, decay_in_update, MATH)
    if TAIL:
        u = tl.where(mask, u, 0.0)
    return acc_x + x * x, acc_u + u * u


@triton.jit
def _moments_chunk(x_addr, g_addr, m_addr, v_addr, start, length, keep, factor,
                   decay_m, decay_v, weight_g, weight_g2, correction_m, correction_v,
                   eps_in, eps_out, decay_in_grad, decay_in_update,
                   X_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MATH: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Pass 1 over one chunk: its Σx², Σu²."""
    x_ptr = _pointer(x_addr, X_DTYPE, ALIGNED)
    g_ptr = _pointer(g_addr, G_DTYPE, ALIGNED)
    m_ptr = _pointer(m_addr, M_DTYPE, ALIGNED)
    v_ptr = _pointer(v_addr, M_DTYPE, ALIGNED)
    acc_x = tl.zeros([BLOCK], MATH)
    acc_u = tl.zeros([BLOCK], MATH)
    full = length // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        acc_x, acc_u = _moments_tile(
            x_ptr, g_ptr, m_ptr, v_ptr, offs, None, keep, factor, acc_x, acc_u, decay_m, decay_v, weight_g, weight_g2,
            correction_m, correction_v, eps_in, eps_out, decay_in_grad, decay_in_update, M_DTYPE, MATH, False,
        )  # fmt: skip
    offs = start + full + tl.arange(0, BLOCK)
    tail = full + tl.arange(0, BLOCK) < length
    acc_x, acc_u = _moments_tile(
        x_ptr, g_ptr, m_ptr, v_ptr, offs, tail, keep, factor, acc_x, acc_u, decay_m, decay_v, weight_g, weight_g2,
        correction_m, correction_v, eps_in, eps_out, decay_in_grad, decay_in_update, M_DTYPE, MATH, True,
    )  # fmt: skip
    return tl.sum(acc_x, 0), tl.sum(acc_u, 0)


@triton.jit
def pmd_lamb_moments_kernel(
    ptrs, numels, chunk_tensor, chunk_index, hyper, grad_factor, found_inf, partials, t_now, n_tensors,
    X_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MATH: tl.constexpr,
    HAS_MASTER: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Pass 1 (NOTE [two passes]): moments and per-chunk Σx², Σu²."""
    chunk = tl.program_id(0)
    tensor, start, length = _chunk(chunk, chunk_tensor, chunk_index, numels, CHUNK)
    _, x, g, m, v, step_ptr = _tensor_addresses(ptrs, n_tensors, tensor, HAS_MASTER)
    X_READ: tl.constexpr = MASTER_DTYPE if HAS_MASTER else X_DTYPE  # the parameter is not read beside a master

    keep = tl.load(found_inf) == 0  # NOTE [skipped steps]
    t = tl.load(step_ptr).to(MATH) + keep.to(MATH)
    tl.store(t_now + tensor, t, mask=start == 0)  # pass 2 reads t here, not the racing step
    (decay_m, decay_v, weight_g, weight_g2, correction_m, correction_v,
     eps_in, eps_out, decay_in_grad, decay_in_update) = _step_coefficients(hyper, tensor, t, MATH)  # fmt: skip
    factor = tl.load(grad_factor).to(MATH)

    if _aligned(x) & _aligned(g) & _aligned(m) & _aligned(v):  # NOTE [vector and scalar paths]
        sum_x, sum_u = _moments_chunk(
            x, g, m, v, start, length, keep, factor, decay_m, decay_v, weight_g, weight_g2, correction_m,
            correction_v, eps_in, eps_out, decay_in_grad, decay_in_update, X_READ, G_DTYPE, M_DTYPE, MATH, True,
            BLOCK,
        )  # fmt: skip
    else:
        sum_x, sum_u = _moments_chunk(
            x, g, m, v, start, length, keep, factor, decay_m, decay_v, weight_g, weight_g2, correction_m,
            correction_v, eps_in, eps_out, decay_in_grad, decay_in_update, X_READ, G_DTYPE, M_DTYPE, MATH, False,
            BLOCK,
        )  # fmt: skip
    tl.store(partials + 2 * chunk, sum_x)
    tl.store(partials + 2 * chunk + 1, sum_u)


@triton.jit
def _update_tile(x_ptr, param_ptr, m_ptr, v_ptr, offs, mask, keep, ratio, stochastic, key,
                 correction_m, correction_v, eps_in, eps_out, decay_in_update,
                 X_DTYPE: tl.constexpr, MATH: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                 TAIL: tl.constexpr):  # fmt: skip
    x = _load(x_ptr + offs, mask, TAIL, "").to(MATH)
    m = _load(m_ptr + offs, mask, TAIL, "evict_first").to(MATH)
    v = _load(v_ptr + offs, mask, TAIL, "evict_first").to(MATH)
    u = _direction(m, v, x, correction_m, correction_v, eps_in, eps_out, decay_in_update, MATH)
    store_mask = _store_mask(mask, keep, TAIL)
    x = x - ratio * u
    if HAS_MASTER:  # the master keeps x, the parameter gets it rounded
        tl.store(x_ptr + offs, x, mask=store_mask)
    tl.store(param_ptr + offs, _parameter_value(x, offs, stochastic, key, X_DTYPE, STOCHASTIC), mask=store_mask)


@triton.jit
def _tensor_sums(partials, first_chunk, chunk_count, tensor, MATH: tl.constexpr, REDUCE_BLOCK: tl.constexpr):
    """‖x‖², ‖u‖² of one whole tensor: its chunks' partials summed in a fixed order. Under
    NOTE [sharded norms] first_chunk/chunk_count point at one reduced pair per tensor."""
    first = tl.load(first_chunk + tensor)
    count = tl.load(chunk_count + tensor)
    sum_x = tl.zeros([REDUCE_BLOCK], MATH)
    sum_u = tl.zeros([REDUCE_BLOCK], MATH)
    for j in range(0, count, REDUCE_BLOCK):
        k = j + tl.arange(0, REDUCE_BLOCK)
        sum_x += tl.load(partials + 2 * (first + k), mask=k < count, other=0.0)
        sum_u += tl.load(partials + 2 * (first + k) + 1, mask=k < count, other=0.0)
    return tl.sum(sum_x, 0), tl.sum(sum_u, 0)


@triton.jit
def tensor_sums_kernel(partials, first_chunk, chunk_count, sums, MATH: tl.constexpr, REDUCE_BLOCK: tl.constexpr):
    """Each tensor's local Σx², Σu² from its partials, for the all-reduce of NOTE [sharded norms]."""
    tensor = tl.program_id(0)
    sum_x, sum_u = _tensor_sums(partials, first_chunk, chunk_count, tensor, MATH, REDUCE_BLOCK)
    tl.store(sums + 2 * tensor, sum_x)
    tl.store(sums + 2 * tensor + 1, sum_u)


@triton.jit
def _update_chunk(x_addr, param_addr, m_addr, v_addr, start, length, keep, ratio, stochastic, key,
                  correction_m, correction_v, eps_in, eps_out, decay_in_update,
                  X_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MATH: tl.constexpr, HAS_MASTER: tl.constexpr,
                  STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Pass 2 over one chunk: x ← x − ratio·u, and the parameter from x."""
    param_ptr = _pointer(param_addr, X_DTYPE, ALIGNED)
    x_ptr = param_ptr
    if HAS_MASTER:
        x_ptr = _pointer(x_addr, MASTER_DTYPE, ALIGNED)
    m_ptr = _pointer(m_addr, M_DTYPE, ALIGNED)
    v_ptr = _pointer(v_addr, M_DTYPE, ALIGNED)
    full = length // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        offs = start + off + tl.arange(0, BLOCK)
        _update_tile(x_ptr, param_ptr, m_ptr, v_ptr, offs, None, keep, ratio, stochastic, key, correction_m,
                     correction_v, eps_in, eps_out, decay_in_update, X_DTYPE, MATH, HAS_MASTER, STOCHASTIC,
                     False)  # fmt: skip
    offs = start + full + tl.arange(0, BLOCK)
    tail = full + tl.arange(0, BLOCK) < length
    _update_tile(x_ptr, param_ptr, m_ptr, v_ptr, offs, tail, keep, ratio, stochastic, key, correction_m,
                 correction_v, eps_in, eps_out, decay_in_update, X_DTYPE, MATH, HAS_MASTER, STOCHASTIC,
                 True)  # fmt: skip


@triton.jit
def pmd_lamb_update_kernel(
    ptrs, numels, chunk_tensor, chunk_index, first_chunk, chunk_count, hyper, found_inf, partials, t_now,
    records, n_tensors,
    X_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, MATH: tl.constexpr, HAS_MASTER: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, REDUCE_BLOCK: tl.constexpr, RECORD: tl.constexpr,
):  # fmt: skip
    """Pass 2 (NOTE [two passes]): trust ratio from the partials, then x ← x − η·α·ratio·u. With RECORD, the first
    program of each tensor writes its record (NOTE [trust-ratio records] in backends/tables.py)."""
    chunk = tl.program_id(0)
    tensor, start, length = _chunk(chunk, chunk_tensor, chunk_index, numels, CHUNK)
    param, x, _, m, v, step_ptr = _tensor_addresses(ptrs, n_tensors, tensor, HAS_MASTER)

    keep = tl.load(found_inf) == 0
    t = tl.load(t_now + tensor)
    tl.store(step_ptr, t.to(tl.float32), mask=start == 0)
    _, _, _, _, correction_m, correction_v, eps_in, eps_out, _, decay_in_update = _step_coefficients(
        hyper, tensor, t, MATH
    )
    STOCHASTIC: tl.constexpr = (X_DTYPE == tl.bfloat16) and not HAS_MASTER  # NOTE [bf16 bits]
    stochastic, key = _rounding_key(hyper, tensor, t, STOCHASTIC)

    sum_x, sum_u = _tensor_sums(partials, first_chunk, chunk_count, tensor, MATH, REDUCE_BLOCK)
    x_norm = _sqrt(sum_x, MATH)
    u_norm = _sqrt(sum_u, MATH)
    trusted = (tl.load(hyper + tensor * N_HYPER + USE_TRUST_RATIO) != 0) & (x_norm > 0) & (u_norm > 0)
    lr_alpha = tl.load(hyper + tensor * N_HYPER + LR_ALPHA).to(MATH)
    lo = tl.load(hyper + tensor * N_HYPER + TRUST_RATIO_MIN).to(MATH)
    hi = tl.load(hyper + tensor * N_HYPER + TRUST_RATIO_MAX).to(MATH)
    applied = tl.where(trusted, tl.minimum(tl.maximum(_div(x_norm, u_norm, MATH), lo), hi), 1.0)
    # NOTE [non-finite gradients] (in largedet_kernels/reference.py): a norm that is not finite makes all of x NaN.
    finite = (x_norm < float("inf")) & (u_norm < float("inf"))
    applied = tl.where(finite, applied, float("nan"))
    ratio = lr_alpha * applied
    if RECORD:
        record = records + tensor * N_RECORD
        first = (start == 0) & keep
        tl.store(record + RECORD_STEP, t, mask=first)
        tl.store(record + RECORD_X_NORM, x_norm, mask=first)
        tl.store(record + RECORD_U_NORM, u_norm, mask=first)
        tl.store(record + RECORD_RATIO, applied, mask=first)

    aligned = _aligned(x) & _aligned(m) & _aligned(v)  # NOTE [vector and scalar paths]
    if HAS_MASTER:  # the parameter is a stream of its own
        aligned = aligned & _aligned(param)
    if aligned:
        _update_chunk(x, param, m, v, start, length, keep, ratio, stochastic, key, correction_m, correction_v,
                      eps_in, eps_out, decay_in_update, X_DTYPE, M_DTYPE, MATH, HAS_MASTER, STOCHASTIC, True,
                      BLOCK)  # fmt: skip
    else:
        _update_chunk(x, param, m, v, start, length, keep, ratio, stochastic, key, correction_m, correction_v,
                      eps_in, eps_out, decay_in_update, X_DTYPE, M_DTYPE, MATH, HAS_MASTER, STOCHASTIC, False,
                      BLOCK)  # fmt: skip


@triton.jit
def _sumsq_chunk(g_addr, start, length, G_DTYPE: tl.constexpr, MATH: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):  # fmt: skip
    """Σg² of one chunk."""
    g_ptr = _pointer(g_addr, G_DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], MATH)
    full = length // BLOCK * BLOCK
    for off in range(0, full, BLOCK):
        g = _load(g_ptr + start + off + tl.arange(0, BLOCK), None, False, "").to(MATH)
        acc += g * g
    tail = full + tl.arange(0, BLOCK) < length
    g = _load(g_ptr + start + full + tl.arange(0, BLOCK), tail, True, "").to(MATH)
    acc += g * g
    return tl.sum(acc, 0)


@triton.jit
def grad_sumsq_kernel(
    ptrs, numels, chunk_tensor, chunk_index, partials, n_tensors,
    G_DTYPE: tl.constexpr, MATH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per-chunk Σg² for global-norm clipping (the extra pass when max_grad_norm is set)."""
    chunk = tl.program_id(0)
    tensor, start, length = _chunk(chunk, chunk_tensor, chunk_index, numels, CHUNK)
    g = tl.load(ptrs + G * n_tensors + tensor)
    if _aligned(g):  # NOTE [vector and scalar paths]
        total = _sumsq_chunk(g, start, length, G_DTYPE, MATH, True, BLOCK)
    else:
        total = _sumsq_chunk(g, start, length, G_DTYPE, MATH, False, BLOCK)
    tl.store(partials + chunk, total)

"""Forward pass F3: out = x * ca * sa, the only pass that writes a full tensor."""
import triton
import triton.language as tl

from .plane import _plane_offsets


@triton.jit
def _gate_apply_kernel(
    x_ptr,    # [N, C x P plane], input dtype
    ca_ptr,   # [N, C] ACC_DTYPE  channel gate
    sa_ptr,   # [N, P] ACC_DTYPE  spatial gate (HAS_SA); else unused
    out_ptr,  # [N, C x P plane], input dtype, same layout as x
    C, P, num_c_blocks, num_p_blocks,
    HAS_SA: tl.constexpr,
    P_CONTIG: tl.constexpr,  # True for NCHW, False for channels_last
    ACC_DTYPE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """out[c, p] = (x[c, p] * ca[c]) * sa[p], computed in ACC_DTYPE and rounded once.

    The product is formed in the same order as y = x * ca in F2, so the values the
    spatial max saw are the values that are scaled here.
    """
    pid = tl.program_id(0)
    if P_CONTIG:
        pb = pid % num_p_blocks
        cb = (pid // num_p_blocks) % num_c_blocks
    else:
        cb = pid % num_c_blocks
        pb = (pid // num_c_blocks) % num_p_blocks
    n = pid // (num_c_blocks * num_p_blocks)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask_p = offs_p < P
    mask = mask_c[:, None] & mask_p[None, :]
    plane = n.to(tl.int64) * C * P + _plane_offsets(offs_c, offs_p, C, P, P_CONTIG)

    x = tl.load(x_ptr + plane, mask=mask, other=0.0).to(ACC_DTYPE)
    ca = tl.load(ca_ptr + n.to(tl.int64) * C + offs_c, mask=mask_c, other=0.0)
    y = x * ca[:, None]
    if HAS_SA:
        sa = tl.load(sa_ptr + n.to(tl.int64) * P + offs_p, mask=mask_p, other=0.0)
        y = y * sa[None, :]
    tl.store(out_ptr + plane, y.to(out_ptr.dtype.element_ty), mask=mask)

"""The fused quantization pass (``kernels/quantize.py``, ``quantize_qkv(..., fused=True)``, opt-in until it passes every GPU test): the
Triton statistics kernels against ``reference.kv_stats``, and the one-launch Q/K/V quantization against the
three-launch pass (``fused=False``) and the torch reference ``reference.quantize_qkv``, field by field.

What is asserted, and why it can be asserted that tightly:

* **Same statistics ⇒ same bits.** The fused launch fed the statistics of the three-launch pass
  (``quantize_qkv_fused(..., stats=stats_buffer_from_torch(*reference.kv_stats(...)))``) must equal
  ``fused=False`` bit for bit in every field: both run the same per-tile code on the same device.
* **Statistics kernel vs ``kv_stats``:** the means differ only in the order of the fp32 sums, so they agree
  to a few ulps of the summed magnitudes (``rtol=1e-6`` plus an absolute term of ``2^-20 · max|x|``); V's
  amax without smoothing is an exact max and must be bit-equal; with smoothing it inherits the mean's ulps.
* **Fused (own statistics) vs three-launch / reference:** a mean that moves by an ulp can move an INT8 code
  by one where ``x·127/amax`` sits on a rounding tie (and an FP8 code where ``v·448/amax`` does). Asserted:
  codes differ by at most 1 (INT8) / one e4m3 step (FP8), in at most 0.1% of the elements (in practice none
  or one or two); scales to ``rtol=1e-6``. Q does not depend on statistics: its codes and scales are equal
  between the two Triton passes bit for bit. Against the torch reference the same tie rule applies to Q as to
  K (the reference's ``127/amax`` is ``reciprocal·127``, the kernel's a correctly rounded division, so an ulp
  there could also flip a tie).
* **FP8 under the interpreter:** its fp32 → e4m3 conversion drops the carry when rounding reaches the next
  power of two (7.88 → 4, not 8) and double-rounds some values by one e4m3 step; against the torch reference
  an FP8 code must then be equal, within one e4m3 step, or half of a power-of-two reference. Between the two
  Triton passes (same conversion) it is asserted as above. The ``gpu`` tests check FP8 tightly.

Inputs have the structure of real DiT activations (``sagevideo.testing.structured_qkv`` with large
per-channel K offsets, outlier channels and biased V), in contiguous BHSD and as strided BHSD views of BSHD
buffers with a storage offset and padded rows.
"""

import os

import pytest
import torch

from sagevideo import reference
from sagevideo.testing import structured_qkv
from tests.conftest import HAS_CUDA

triton = pytest.importorskip("triton")
from sagevideo.kernels import quantize  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
FIELDS = ("q", "q_scale", "k", "k_scale", "v", "v_scale", "v_mean", "lse_offset")


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------


def _inputs(b, hq, hk, sq, skv, d, dtype=torch.float16, seed=0, strided=False, device=DEVICE):
    """Structured Q, K, V (BHSD). ``strided``: views of BSHD buffers with 8 spare channels per row and the
    data starting 3 elements in (non-contiguous, storage offset, row stride ≠ D)."""
    q, k, v = structured_qkv(b, hq, hk, sq, skv, d, dtype=dtype, seed=seed, layout="BSHD" if strided else "BHSD",
                             k_offset_std=6.0, outlier_channels=3, outlier_gain=8.0, v_bias_std=2.0)
    if not strided:
        return q.to(device), k.to(device), v.to(device)
    out = []
    for t in (q, k, v):
        buf = torch.full((*t.shape[:-1], d + 8), float("nan"), dtype=dtype)  # NaN: the spare channels are never read
        buf[..., 3 : 3 + d] = t
        out.append(buf.to(device)[..., 3 : 3 + d].transpose(1, 2))
    return tuple(out)


def _mask(b, skv, seed, empty_row=True, device=DEVICE):
    """Random key-padding mask (True = keep), ~30% dropped; with ``empty_row`` the last batch row keeps nothing."""
    m = torch.rand(b, skv, generator=torch.Generator().manual_seed(seed)) > 0.3
    m[:, 0] = True
    if empty_row and b > 1:
        m[-1] = False
    return m.to(device)


def _rows(t, p):
    """Row ``s`` of the result = row ``p[b, h, s]`` of ``t`` (dim 2)."""
    return t.gather(2, p.long().view(*p.shape, *([1] * (t.dim() - 3))).expand(*p.shape, *t.shape[3:]))


def _perms(b, h, s, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(s, generator=g) for _ in range(h)]) for _ in range(b)]).to(device)


# ----------------------------------------------------------------------------------------------------------
# comparisons
# ----------------------------------------------------------------------------------------------------------


def _v_valid(qkv, d, skv):
    """The part of V the attention reads, as float: FP8 ``(B, Hk, D, Skv)``, 16-bit ``(B, Hk, Skv, D)``."""
    v = qkv.v[:, :, :d, :skv] if qkv.precision == "int8-fp8" else qkv.v[..., :d]
    return v.float()


def _assert_bit_equal(a, b, d, skv, fields=FIELDS):
    """Every field equal bit for bit (FP8 V over the columns the kernel reads, and its zero channels)."""
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        if name == "v" and a.precision == "int8-fp8":
            x, y = x[..., :skv], y[..., :skv]
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y), name
    assert a.kv_tail == b.kv_tail and a.head_dim == b.head_dim


def _assert_codes_close(got, want, name, max_frac=1e-3):
    """INT8 codes: equal except at rounding ties, where they differ by one; ties are rare."""
    diff = (got.to(torch.int16) - want.to(torch.int16)).abs()
    assert int(diff.max()) <= 1, f"{name}: a code differs by {int(diff.max())}"
    n = int((diff != 0).sum())
    assert n <= max(1, int(max_frac * diff.numel())), f"{name}: {n} of {diff.numel()} codes differ"


def _e4m3_step(x):
    """Spacing of e4m3 values at |x| (3 mantissa bits; subnormal spacing 2^-9)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -6)))
    return torch.exp2(e - 3)


def _assert_fp8_close(got, want, name, max_frac=1e-3, interpreter_rounding=False):
    """FP8 codes (as float): equal, except in a few elements by one e4m3 step (a tie moved by an ulp of a
    statistic). With ``interpreter_rounding`` (Triton interpreter vs torch's correctly rounded conversion) any
    number of elements may be one step off, or half of a power-of-two reference (the dropped carry)."""
    off = got != want
    step_ok = (got - want).abs() <= _e4m3_step(torch.maximum(got.abs(), want.abs()))
    if interpreter_rounding:
        pow2 = torch.exp2(torch.round(torch.log2(want.abs().clamp_min(1e-30)))) == want.abs()
        halved = (2 * got == want) & pow2
        assert bool((~off | step_ok | halved).all()), f"{name}: FP8 codes differ beyond the interpreter's rounding"
        assert float(off.float().mean()) < 0.05, f"{name}: {int(off.sum())} of {off.numel()} FP8 codes differ"
        return
    assert bool((~off | step_ok).all()), f"{name}: an FP8 code differs by more than one e4m3 step"
    n = int(off.sum())
    assert n <= max(1, int(max_frac * off.numel())), f"{name}: {n} of {off.numel()} FP8 codes differ"


def _stat_tol(x):
    """Tolerance of a mean whose fp32 sum was taken in another order: a few ulps of the summed magnitudes."""
    return dict(rtol=1e-6, atol=2.0 ** -20 * max(float(x.float().abs().max()), 1.0))


def _assert_close_fields(got, want, d, skv, q_in, k_in, v_in, scale, fp8_interp=False):
    """``got`` (a Triton pass) against ``want`` (the other pass or the torch reference, whose fields are
    unpadded) where their statistics may differ by ulps. A scale is an amax over ``|x − mean|``, which moves
    by at most as much as the mean: its tolerance is the mean's (:func:`_stat_tol`) over 127 (448 for V); the
    LSE term ``scale·q·k_mean`` moves by at most ``scale·Σ|q|`` times it."""
    k_tol, v_tol = _stat_tol(k_in)["atol"], _stat_tol(v_in)["atol"]
    _assert_codes_close(got.q[..., :d], want.q[..., :d], "q")
    torch.testing.assert_close(got.q_scale, want.q_scale, rtol=1e-6, atol=0)
    _assert_codes_close(got.k[..., :d], want.k[..., :d], "k")
    torch.testing.assert_close(got.k_scale, want.k_scale, rtol=1e-6, atol=k_tol / 127)
    if got.lse_offset is not None:
        lo = want.lse_offset
        atol = 1e-5 * float(lo.abs().max()) + scale * float(q_in.float().abs().sum(-1).max()) * k_tol
        torch.testing.assert_close(got.lse_offset, lo, rtol=1e-5, atol=atol)
    gv, wv = _v_valid(got, d, skv), _v_valid(want, d, skv)
    if got.precision == "int8-fp8":
        _assert_fp8_close(gv, wv, "v", interpreter_rounding=fp8_interp)
        v_atol = v_tol / 448 if got.v_mean is not None else 0.0  # without smoothing: an exact max
        torch.testing.assert_close(got.v_scale[..., :d], want.v_scale[..., :d], rtol=1e-6, atol=v_atol)
    else:  # 16-bit V minus a mean that may differ by an ulp: one 16-bit rounding step at most
        assert got.v.dtype == want.v.dtype
        torch.testing.assert_close(gv, wv, rtol=2.0 ** -7, atol=2.0 ** -20 * float(v_in.float().abs().max()))
    assert (got.v_mean is None) == (want.v_mean is None)
    if got.v_mean is not None:
        torch.testing.assert_close(got.v_mean[..., :d], want.v_mean[..., :d], **_stat_tol(v_in))


def _assert_padding_zero(qkv, d, skv):
    """Channels past D are written as zeros (and V's scale and mean are zero there), and so are Vᵀ's columns
    past S_kv up to its 16-aligned pitch (``torch.empty`` memory otherwise: an FP8 NaN is possible there)."""
    assert (qkv.q[..., d:] == 0).all() and (qkv.k[..., d:] == 0).all()
    if qkv.precision == "int8-fp8":
        assert (qkv.v[:, :, d:, :skv].float() == 0).all()
        assert (qkv.v[..., skv:].view(torch.uint8) == 0).all()
        assert (qkv.v_scale[..., d:] == 0).all()
    if qkv.v_mean is not None:
        assert (qkv.v_mean[..., d:] == 0).all()


def _check_all(q, k, v, *, precision, mask=None, smooth_v=False, need_lse=True, scale=None):
    """Run the three passes and the reference on one input; assert the relations of the module docstring."""
    b, hq, sq, d = q.shape
    hk, skv = k.shape[1], k.shape[2]
    dp = quantize.padded_head_dim(d)
    kw = dict(scale=scale, precision=precision, key_padding_mask=mask, smooth_v=smooth_v, need_lse=need_lse)
    fused = quantize.quantize_qkv(q, k, v, **kw, fused=True)
    split = quantize.quantize_qkv(q, k, v, **kw, fused=False)
    stats = quantize.stats_buffer_from_torch(
        *reference.kv_stats(k, v, mask, smooth_v=smooth_v, need_v_amax=precision == "int8-fp8"), dp)
    same_stats = quantize.quantize_qkv_fused(q, k, v, **kw, stats=stats)
    ref = reference.quantize_qkv(q, k, v, scale=scale, precision=precision, key_padding_mask=mask, smooth_v=smooth_v)

    # the layout
    assert fused.q.shape == (b, hq, sq, dp) and fused.k.shape == (b, hk, skv, dp)
    assert fused.q.dtype == fused.k.dtype == torch.int8
    if precision == "int8-fp8":
        assert fused.v.dtype == torch.float8_e4m3fn and fused.v.shape[:3] == (b, hk, dp)
        assert fused.v.shape[3] % 16 == 0 and fused.v.shape[3] >= skv
        assert fused.v_scale.shape == (b, hk, dp) and fused.v_scale.is_contiguous()
    else:
        assert fused.v.shape == (b, hk, skv, d) and fused.v_scale is None
    assert (fused.v_mean is not None) == smooth_v and (fused.lse_offset is not None) == need_lse
    if smooth_v:
        assert fused.v_mean.shape == (b, hk, dp) and fused.v_mean.is_contiguous()
    _assert_padding_zero(fused, d, skv)
    _assert_padding_zero(split, d, skv)

    # 1. the fused launch on the three-launch pass's statistics: the same bits
    _assert_bit_equal(same_stats, split, d, skv)
    # 2. the fused pass with its own statistics: equal up to rounding ties
    scale = reference.default_scale(d) if scale is None else scale
    _assert_close_fields(fused, split, d, skv, q, k, v, scale)
    # Q needs no statistics: the two Triton passes agree on it exactly (LSE term aside: it reads K's mean)
    assert torch.equal(fused.q, split.q) and torch.equal(fused.q_scale, split.q_scale)
    # 3. both against the torch reference
    for got in (fused, split):
        _assert_close_fields(got, ref, d, skv, q, k, v, scale, fp8_interp=INTERPRETED)
    return fused, split


# ----------------------------------------------------------------------------------------------------------
# the statistics kernel
# ----------------------------------------------------------------------------------------------------------


STATS_CASES = [
    # (dtype, masked, smooth_v, need_v_amax, strided, skv, d)
    (torch.float16, False, False, True, False, 50, 40),
    (torch.float16, True, True, True, False, 50, 40),
    (torch.bfloat16, False, True, True, True, 37, 64),
    (torch.bfloat16, True, False, True, True, 37, 24),
    (torch.float32, True, True, False, False, 70, 64),
    (torch.float32, False, False, False, True, 50, 40),
]


def _stats_id(c):
    dtype, masked, smooth_v, need_amax, strided, skv, d = c
    return f"{str(dtype)[6:]}-m{int(masked)}s{int(smooth_v)}a{int(need_amax)}t{int(strided)}-{skv}x{d}"


@pytest.mark.parametrize("case", STATS_CASES, ids=_stats_id)
def test_stats_kernel_matches_kv_stats(case):
    dtype, masked, smooth_v, need_amax, strided, skv, d = case
    b, hk = 2, 2
    _, k, v = _inputs(b, 2, hk, 8, skv, d, dtype=dtype, seed=skv + d, strided=strided)
    mask = _mask(b, skv, 5) if masked else None
    if DEVICE == "cpu":  # the shape exercises the combine step: several programs per head, several tiles each
        _, tiles, n_split = quantize._stats_split(skv, quantize.padded_head_dim(d), b * hk, k.device)
        assert tiles >= 2 and n_split >= 2
    got = quantize.kv_stats_triton(k, v, mask, smooth_v=smooth_v, need_v_amax=need_amax)
    want = reference.kv_stats(k, v, mask, smooth_v=smooth_v, need_v_amax=need_amax)
    for name, g, w, x in zip(("k_mean", "v_mean", "v_amax"), got, want, (k, v, v)):
        assert (g is None) == (w is None), name
        if g is None:
            continue
        assert g.shape == w.shape == (b, hk, d) and g.dtype == torch.float32, name
        if name == "v_amax" and not smooth_v:
            assert torch.equal(g, w), name  # a max of exact values: no rounding at all
        else:
            torch.testing.assert_close(g, w, **_stat_tol(x), msg=name)
    if masked:  # the batch row that keeps no key: zero mean, zero amax (then the AMAX_EPS floor)
        assert (got[0][-1] == 0).all()
        if need_amax:
            assert (got[2][-1] == 0).all()
    # the full buffer: channels past D are zero, the scale and its inverse follow from the amax as in torch
    st = quantize.kv_stats_buffer(k, v, mask, smooth_v=smooth_v, need_v_amax=need_amax)
    assert (st[0, ..., d:] == 0).all()
    if need_amax:
        amax = st[2, ..., :d].clamp_min(reference.AMAX_EPS)
        # torch's ``448 / amax`` is ``reciprocal(amax)·448``, which the kernel reproduces exactly; ``amax / 448``
        # is a correctly rounded division on the CPU but a multiplication by 1/448 on CUDA (one ulp)
        assert torch.equal(st[4, ..., :d], reference.FP8_MAX / amax)
        torch.testing.assert_close(st[3, ..., :d], amax / reference.FP8_MAX, rtol=2.0 ** -23, atol=0)
        assert (st[2:, ..., d:] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# the fused pass
# ----------------------------------------------------------------------------------------------------------


PASS_CASES = {
    # name: (b, hq, hk, sq, skv, d, dtype, strided, masked, smooth_v)
    "plain": (2, 2, 2, 37, 50, 40, torch.float16, False, False, False),
    "mask": (2, 2, 2, 37, 50, 40, torch.float16, False, True, False),
    "smooth_v": (2, 2, 2, 50, 37, 64, torch.bfloat16, False, False, True),
    "mask+smooth_v": (2, 2, 2, 37, 50, 24, torch.float32, False, True, True),
    "gqa": (2, 4, 2, 37, 50, 40, torch.float16, False, True, True),
    "bshd_view": (2, 4, 2, 50, 37, 40, torch.bfloat16, True, True, False),
    "mqa+bshd_view": (1, 4, 1, 37, 50, 64, torch.float16, True, False, True),
}


@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
@pytest.mark.parametrize("case", list(PASS_CASES))
def test_fused_pass_equals_three_launch_and_reference(case, precision):
    b, hq, hk, sq, skv, d, dtype, strided, masked, smooth_v = PASS_CASES[case]
    q, k, v = _inputs(b, hq, hk, sq, skv, d, dtype=dtype, seed=len(case), strided=strided)
    mask = _mask(b, skv, 7) if masked else None
    _check_all(q, k, v, precision=precision, mask=mask, smooth_v=smooth_v, scale=0.3 if case == "gqa" else None)


@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
def test_without_lse_and_16bit_v_without_copy(precision):
    """need_lse=False: no LSE term, the rest unchanged; int8-fp16 with a 16-bit input and nothing to subtract or
    gather hands the caller's V through without a copy."""
    q, k, v = _inputs(2, 2, 2, 37, 50, 40, dtype=torch.float16, seed=4)
    fused, _ = _check_all(q, k, v, precision=precision, need_lse=False)
    with_lse = quantize.quantize_qkv(q, k, v, precision=precision, need_lse=True, fused=True)
    assert fused.lse_offset is None
    for name in ("q", "q_scale", "k", "k_scale"):
        assert torch.equal(getattr(fused, name), getattr(with_lse, name))
    if precision == "int8-fp16":
        assert fused.v is v


@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
@pytest.mark.parametrize("smooth_v", [False, True])
def test_fused_gathers_and_zeroed_tail(precision, smooth_v):
    """q_gather/kv_gather (per-head permutations), kv_tail, a key-padding mask and strided GQA inputs: the fused
    pass equals the three-launch pass on the same statistics bit for bit, and equals its own ungathered output
    with the rows permuted (the statistics do not depend on the order); the tail is zero."""
    b, hq, hk, sq, skv, d = 2, 4, 2, 37, 50, 40
    q, k, v = _inputs(b, hq, hk, sq, skv, d, dtype=torch.bfloat16, seed=9, strided=True)
    qp, kp = _perms(b, hq, sq, 1), _perms(b, hk, skv, 2)
    mask = _mask(b, skv, 3)
    tail = 16
    kw = dict(precision=precision, key_padding_mask=mask, smooth_v=smooth_v, need_lse=True)
    got = quantize.quantize_qkv(q, k, v, **kw, q_gather=qp, kv_gather=kp, kv_tail=tail, fused=True)
    split = quantize.quantize_qkv(q, k, v, **kw, q_gather=qp, kv_gather=kp, kv_tail=tail, fused=False)
    dp = quantize.padded_head_dim(d)
    stats = quantize.stats_buffer_from_torch(
        *reference.kv_stats(k, v, mask, smooth_v=smooth_v, need_v_amax=precision == "int8-fp8"), dp)
    same_stats = quantize.quantize_qkv_fused(q, k, v, **kw, q_gather=qp, kv_gather=kp, kv_tail=tail, stats=stats)
    _assert_bit_equal(same_stats, split, d, skv)
    _assert_close_fields(got, split, d, skv, q, k, v, reference.default_scale(d))

    plain = quantize.quantize_qkv(q, k, v, **kw, fused=True)
    assert torch.equal(got.q, _rows(plain.q, qp)) and torch.equal(got.q_scale, _rows(plain.q_scale, qp))
    assert torch.equal(got.lse_offset, _rows(plain.lse_offset, qp))
    assert torch.equal(got.k, _rows(plain.k, kp)) and torch.equal(got.k_scale, _rows(plain.k_scale, kp))
    if precision == "int8-fp8":
        pv = plain.v[..., :skv].float().gather(3, kp[:, :, None, :].long().expand(b, hk, dp, skv))
        assert torch.equal(got.v[..., :skv].float(), pv) and torch.equal(got.v_scale, plain.v_scale)
        # the zeroed tail: K rows, K scales and Vᵀ columns past Skv, read by the unmasked block-sparse tiles
        assert got.kv_tail == tail and got.k.shape[2] == skv and not got.k.is_contiguous()
        k_buf = got.k.as_strided((b, hk, skv + tail, dp), got.k.stride())
        ks_buf = got.k_scale.as_strided((b, hk, skv + tail), got.k_scale.stride())
        assert (k_buf[:, :, skv:] == 0).all() and (ks_buf[:, :, skv:] == 0).all()
        assert got.v.shape[3] >= skv + tail and (got.v[..., skv:].float() == 0).all()
    else:
        assert got.kv_tail == 0  # no tail without FP8 V
        assert torch.equal(got.v, _rows(plain.v, kp))
    if smooth_v:
        assert torch.equal(got.v_mean, plain.v_mean)


@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
def test_launch_parameters_do_not_change_results(precision):
    """Other tile heights for Q/K and for V (down to 16 rows, up to more rows than the sequence), other warp
    counts: the same bits (the tiles are per-row / per-column arithmetic), except the LSE term, a sum over
    channels whose order may follow the warp layout on the GPU (fp32 rounding); other statistics tiles and
    splits: statistics equal to fp32 rounding. Unknown launch parameters are refused."""
    b, hq, hk, sq, skv, d = 2, 4, 2, 37, 50, 40
    q, k, v = _inputs(b, hq, hk, sq, skv, d, dtype=torch.float16, seed=6)
    mask = _mask(b, skv, 8)
    kw = dict(precision=precision, key_padding_mask=mask, smooth_v=True, need_lse=True)
    st = quantize.kv_stats_buffer(k, v, mask, smooth_v=True, need_v_amax=precision == "int8-fp8")
    base = quantize.quantize_qkv_fused(q, k, v, **kw, stats=st.clone())
    for cfg in (dict(BLOCK_S=16, V_BLOCK_S=32, num_warps=8), dict(BLOCK_S=32, V_BLOCK_S=16, num_warps=2),
                dict(V_BLOCK_S=16), dict(BLOCK_S=64, V_BLOCK_S=64, num_warps=1)):
        got = quantize.quantize_qkv_fused(q, k, v, **kw, stats=st.clone(), config=cfg)
        _assert_bit_equal(got, base, d, skv, fields=[f for f in FIELDS if f != "lse_offset"])
        torch.testing.assert_close(got.lse_offset, base.lse_offset, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="V_BLOCK_S"):
        quantize.quantize_qkv_fused(q, k, v, **kw, stats=st.clone(), config=dict(V_PACK=False))
    other = quantize.kv_stats_buffer(k, v, mask, smooth_v=True, need_v_amax=precision == "int8-fp8",
                                     config=dict(BLOCK_S=32, TILES=1))
    rows = 3 if precision == "int8-fp8" else 2  # k mean, v mean (and v amax)
    for r, x in zip(range(rows), (k, v, v)):
        torch.testing.assert_close(other[r], st[r], **_stat_tol(x))


@pytest.mark.parametrize("fused", [True, False])
def test_v_padding_is_written_even_over_nan_memory(monkeypatch, fused):
    """Vᵀ's pitch is rounded up to 16 columns; both passes write zeros there, so memory left from earlier use
    (here: filled with 0x7F, an FP8 NaN) never shows through."""
    real = quantize._v_fp8_buffer

    def dirty(*args):
        buf = real(*args)
        buf.view(torch.uint8).fill_(0x7F)
        return buf

    monkeypatch.setattr(quantize, "_v_fp8_buffer", dirty)
    b, hq, hk, s, d = 1, 2, 2, 50, 40  # 50 keys: a pitch of 64 columns, 14 of them padding
    q, k, v = _inputs(b, hq, hk, s, s, d)
    qkv = quantize.quantize_qkv(q, k, v, precision="int8-fp8", smooth_v=True, fused=fused)
    assert qkv.v.shape[-1] == 64
    assert (qkv.v[..., s:].view(torch.uint8) == 0).all()
    assert not torch.isnan(qkv.v.float()).any()


def test_bad_arguments():
    q, k, v = _inputs(1, 2, 2, 20, 20, 32, seed=1)
    with pytest.raises(ValueError, match="q_gather"):
        quantize.quantize_qkv(q, k, v, q_gather=_perms(1, 2, 19, 0), fused=True)
    with pytest.raises(ValueError, match="kv_tail"):
        quantize.quantize_qkv(q, k, v, kv_tail=-1, fused=True)
    with pytest.raises(ValueError, match="stats"):
        quantize.quantize_qkv_fused(q, k, v, stats=torch.zeros(5, 1, 2, 16, device=q.device))


# ----------------------------------------------------------------------------------------------------------
# on the GPU (compiled kernels, FP8 checked tightly), at bigger shapes
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
@pytest.mark.parametrize(
    "shape,dtype,strided,masked,smooth_v",
    [
        ((2, 8, 4, 3000, 2900, 128), torch.bfloat16, True, True, True),
        ((2, 4, 4, 1000, 1100, 80), torch.float16, False, True, False),
        ((1, 12, 12, 32760, 32760, 128), torch.bfloat16, False, False, False),  # Wan2.1-1.3B
    ],
    ids=["gqa-bshd-mask-smooth", "d80-mask", "wan-1.3b"],
)
def test_gpu_fused_pass_equals_three_launch_and_reference(precision, shape, dtype, strided, masked, smooth_v):
    b, hq, hk, sq, skv, d = shape
    q, k, v = _inputs(b, hq, hk, sq, skv, d, dtype=dtype, seed=17, strided=strided, device="cuda")
    mask = _mask(b, skv, 11, device="cuda") if masked else None
    _, tiles, n_split = quantize._stats_split(skv, quantize.padded_head_dim(d), b * hk, k.device)
    assert n_split >= 2  # several programs per head: the combine step is exercised
    _check_all(q, k, v, precision=precision, mask=mask, smooth_v=smooth_v)

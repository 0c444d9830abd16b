"""Tests of the public op ``sagevideo.attention``.

Every test runs on CPU (where the quantized modes execute their torch reference) and, on a GPU machine, on
CUDA (where they execute the Triton kernels); ``pytest -m gpu`` selects the CUDA half.

Bounds (measured values are printed by benchmarks/attention.py):
* against float64 exact attention on structured inputs: ``int8-fp8`` cos ≥ 0.9995, rel-L1 ≤ 0.03;
  ``int8-fp16`` cos ≥ 0.9998, rel-L1 ≤ 0.015;
* kernel against its torch reference (GPU, fp32 in/out so output rounding does not blur it): rel-L1 ≤ 2e-3
  for ``int8-fp8`` (P and V in e4m3: an ulp flip of one element moves an output by ~1/16 of that term),
  ≤ 1e-4 for ``int8-fp16``; LSE within 1e-4.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import sagevideo
from sagevideo import ops, reference
from sagevideo.testing import error_metrics, structured_qkv
from tests.conftest import devices

QUANT = ["int8-fp8", "int8-fp16"]
EXACT_BOUNDS = {"int8-fp8": (0.9995, 0.03), "int8-fp16": (0.9998, 0.015)}
KERNEL_VS_REF_L1 = {"int8-fp8": 2e-3, "int8-fp16": 1e-4}


def to_bhsd(t, layout):
    return t if layout == "BHSD" else t.transpose(1, 2)


def exact(q, k, v, layout="BHSD", mask=None):
    o, lse = reference.attention_exact(
        to_bhsd(q, layout).cpu(), to_bhsd(k, layout).cpu(), to_bhsd(v, layout).cpu(),
        key_padding_mask=None if mask is None else mask.cpu(),
    )
    return o, lse


def ref(q, k, v, precision, layout="BHSD", mask=None, smooth_v=False):
    """The quantized torch reference on CPU, fp32 output, BHSD; on CUDA it walks the KV tiles of the kernel
    launch just made (call it after the op), so the rounding is the kernel's."""
    from sagevideo.kernels import quant_attn

    block_n = quant_attn.last_config().get("BLOCK_N", reference.DEFAULT_BLOCK_N) if q.is_cuda else None
    o, lse = reference.quant_attention_ref(
        to_bhsd(q, layout).cpu(), to_bhsd(k, layout).cpu(), to_bhsd(v, layout).cpu(),
        **({} if block_n is None else {"block_n": block_n}),
        precision=precision, key_padding_mask=None if mask is None else mask.cpu(), smooth_v=smooth_v,
    )
    return o.float(), lse


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_accuracy_against_float64(device, precision, head_dim, layout):
    q, k, v = structured_qkv(2, 4, 4, 384, 384, head_dim, device=device, layout=layout, seed=head_dim)
    out = sagevideo.attention(q, k, v, layout=layout, precision=precision)
    assert out.dtype == q.dtype and out.shape == q.shape
    m = error_metrics(to_bhsd(out, layout).cpu(), exact(q, k, v, layout)[0])
    cos_min, l1_max = EXACT_BOUNDS[precision]
    assert m["cos"] >= cos_min and m["rel_l1"] <= l1_max, f"{precision} D={head_dim} {layout} {device}: {m}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT)
def test_really_quantized(device, precision):
    """Catches a silent fall-through to SDPA: on fp32 inputs dense is exact to ~1e-6, the quantized modes
    must be off by the amount their quantization implies (and must equal their reference)."""
    q, k, v = structured_qkv(1, 2, 2, 256, 256, 64, dtype=torch.float32, device=device)
    want = exact(q, k, v)[0]
    dense = error_metrics(sagevideo.attention(q, k, v, precision="dense").cpu(), want)
    quant = error_metrics(sagevideo.attention(q, k, v, precision=precision).cpu(), want)
    assert dense["rel_l1"] < 1e-5
    assert quant["rel_l1"] > 1e-3, f"{precision} is as exact as dense: not quantized? {quant}"
    assert quant["rel_l1"] > 100 * dense["rel_l1"]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT)
@pytest.mark.parametrize(
    "shape",  # (B, Hq, Hk, Sq, Skv, D): tails, GQA/MQA, Sq != Skv, padded head_dim
    [(1, 2, 2, 1, 1, 64), (2, 4, 1, 63, 65, 64), (1, 4, 2, 130, 70, 128), (1, 2, 2, 100, 129, 40),
     (1, 3, 3, 17, 300, 96)],
)
def test_matches_reference(device, precision, shape):
    b, hq, hk, sq, skv, d = shape
    q, k, v = structured_qkv(b, hq, hk, sq, skv, d, dtype=torch.float32, device=device, seed=sq + skv)
    out, lse = sagevideo.attention(q, k, v, precision=precision, return_lse=True)
    r_out, r_lse = ref(q, k, v, precision)
    m = error_metrics(out.cpu(), r_out)
    assert m["rel_l1"] <= KERNEL_VS_REF_L1[precision], f"{shape} {precision} {device}: {m}"
    torch.testing.assert_close(lse.cpu(), r_lse, atol=1e-4, rtol=1e-3)  # INT8 rounding ties may flip
    # and the LSE is the true one (the K-smoothing term, scale·q·mean(K), is O(10) on these inputs and must
    # be added back), up to the quantization error of QKᵀ, which grows with the scores (outlier channels)
    e_lse = exact(q, k, v)[1].float()
    assert reference.quantize_qkv(q.cpu(), k.cpu(), v.cpu()).lse_offset.abs().mean() > 1.0
    torch.testing.assert_close(lse.cpu(), e_lse, atol=0.3, rtol=0.02)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT + ["dense"])
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
def test_lse_layout(device, precision, layout):
    q, k, v = structured_qkv(2, 3, 3, 50, 70, 64, dtype=torch.float32, device=device, layout=layout)
    out, lse = sagevideo.attention(q, k, v, layout=layout, precision=precision, return_lse=True)
    want = exact(q, k, v, layout)[1].float()
    got = lse.cpu() if layout == "BHSD" else lse.cpu().transpose(1, 2)
    assert lse.shape == ((2, 3, 50) if layout == "BHSD" else (2, 50, 3))
    if precision == "dense":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    else:
        torch.testing.assert_close(got, want, atol=0.3, rtol=0.02)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT + ["dense"])
def test_key_padding_mask_equals_trimmed_keys(device, precision):
    """Batches with different valid lengths: each sample must equal attention over its valid keys only."""
    b, h, sq, skv, d = 3, 2, 40, 150, 64
    q, k, v = structured_qkv(b, h, h, sq, skv, d, dtype=torch.float32, device=device, seed=7)
    valid = [150, 97, 5]
    mask = torch.zeros(b, skv, dtype=torch.bool, device=device)
    for i, n in enumerate(valid):
        mask[i, :n] = True
    k_bad, v_bad = k.clone(), v.clone()
    pad = ~mask[:, None, :, None].expand_as(k)
    k_bad[pad] = 1e4  # garbage in padded keys must not leak into scales or outputs
    v_bad[pad] = -1e4
    out, lse = sagevideo.attention(q, k_bad, v_bad, precision=precision, key_padding_mask=mask, return_lse=True)
    for i, n in enumerate(valid):
        o_i, l_i = sagevideo.attention(
            q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], precision=precision, return_lse=True
        )
        tol = 1e-5 if precision == "dense" else KERNEL_VS_REF_L1[precision]
        m = error_metrics(out[i : i + 1].cpu(), o_i.cpu())
        assert m["rel_l1"] <= tol, f"sample {i} (valid {n}) {precision}: {m}"
        assert (lse[i : i + 1] - l_i).abs().max().item() < 1e-3


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT + ["dense"])
def test_random_mask_against_exact(device, precision):
    q, k, v = structured_qkv(2, 2, 2, 64, 200, 64, dtype=torch.float32, device=device, seed=3)
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 200, generator=g) > 0.4).to(device)
    out = sagevideo.attention(q, k, v, precision=precision, key_padding_mask=mask)
    m = error_metrics(out.cpu(), exact(q, k, v, mask=mask)[0])
    assert m["cos"] >= EXACT_BOUNDS.get(precision, (0.99999, 0))[0], m


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT + ["dense"])
def test_fully_masked_batch_gives_zeros(device, precision):
    q, k, v = structured_qkv(2, 2, 2, 16, 32, 64, dtype=torch.float32, device=device)
    mask = torch.ones(2, 32, dtype=torch.bool, device=device)
    mask[1] = False
    out, lse = sagevideo.attention(q, k, v, precision=precision, key_padding_mask=mask, return_lse=True)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    assert out[0].abs().sum() > 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT + ["dense"])
def test_inputs_never_written(device, precision):
    q, k, v = structured_qkv(1, 2, 2, 70, 90, 64, device=device)
    mask = torch.rand(1, 90, device=device) > 0.2
    before = [t.clone() for t in (q, k, v, mask)]
    sagevideo.attention(q, k, v, precision=precision, key_padding_mask=mask, smooth_v=True, return_lse=True)
    for t, b in zip((q, k, v, mask), before):
        assert torch.equal(t, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", QUANT)
def test_non_contiguous_and_offset_views(device, precision):
    """Ring attention passes KV chunks as views with storage offsets; transposed views are common too."""
    q, k, v = structured_qkv(1, 2, 2, 64, 256, 64, device=device, seed=11)
    k_chunk, v_chunk = k[:, :, 100:200], v[:, :, 100:200]  # non-zero storage offset
    assert k_chunk.storage_offset() > 0
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # BHSD view of BSHD storage
    out_view = sagevideo.attention(q_t, k_chunk, v_chunk, precision=precision, return_lse=True)
    out_copy = sagevideo.attention(
        q.contiguous(), k_chunk.contiguous(), v_chunk.contiguous(), precision=precision, return_lse=True
    )
    assert torch.equal(out_view[0], out_copy[0]) and torch.equal(out_view[1], out_copy[1])


@pytest.mark.parametrize("device", devices())
def test_smooth_v_helps_biased_v(device):
    q, k, v = structured_qkv(1, 4, 4, 256, 256, 64, dtype=torch.float32, device=device, v_bias_std=8.0)
    want = exact(q, k, v)[0]
    plain = error_metrics(sagevideo.attention(q, k, v, precision="int8-fp8").cpu(), want)
    smooth = error_metrics(sagevideo.attention(q, k, v, precision="int8-fp8", smooth_v=True).cpu(), want)
    assert smooth["rel_l1"] < 0.7 * plain["rel_l1"], (plain, smooth)


@pytest.mark.parametrize("device", devices())
def test_large_head_dim_falls_back_to_sdpa(device):
    q, k, v = structured_qkv(1, 1, 1, 32, 32, 256, dtype=torch.float32, device=device)
    ops._said.discard("hd-256")
    with pytest.warns(RuntimeWarning, match="head_dim 256"):
        out = sagevideo.attention(q, k, v, precision="int8-fp8")
    want = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, want, atol=1e-5)
    with warnings.catch_warnings():  # once, not on every call
        warnings.simplefilter("error")
        sagevideo.attention(q, k, v, precision="int8-fp8")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("precision", ["int8-fp8", "dense"])
def test_torch_compile_fullgraph(device, precision):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 64)

        def forward(self, q, k, v, mask):
            o = sagevideo.attention(q, k, v, layout="BSHD", precision=precision, key_padding_mask=mask)
            return self.proj(o)

    torch.manual_seed(0)
    block = Block().to(device)
    q, k, v = structured_qkv(2, 2, 2, 40, 40, 64, dtype=torch.float32, device=device, layout="BSHD")
    mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    mask[1, 30:] = False
    eager = block(q, k, v, mask)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k, v, mask), eager, atol=1e-5, rtol=1e-5)


def test_gpu_only_precision_on_cpu_runs_reference_and_says_so(caplog):
    q, k, v = structured_qkv(1, 2, 2, 40, 40, 64, dtype=torch.float32)
    ops._said.discard("cpu-int8-fp8")
    with caplog.at_level("WARNING", logger="sagevideo"):
        out = sagevideo.attention(q, k, v, precision="int8-fp8")
        sagevideo.attention(q, k, v, precision="int8-fp8")
    notes = [r for r in caplog.records if "torch reference" in r.getMessage()]
    assert len(notes) == 1
    assert torch.equal(out, ref(q, k, v, "int8-fp8")[0])


def test_auto_on_cpu_is_dense():
    q, k, v = structured_qkv(1, 2, 2, 40, 40, 64, dtype=torch.float32)
    assert torch.equal(sagevideo.attention(q, k, v), sagevideo.attention(q, k, v, precision="dense"))


def test_old_gpu_falls_back_to_dense(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    ops._said.discard("old-gpu")
    with pytest.warns(RuntimeWarning, match="below sm80"):
        assert ops.resolve_precision("int8-fp8", torch.device("cuda"), 64) == "dense"


def test_ampere_runs_int8_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert ops.resolve_precision("int8-fp8", torch.device("cuda"), 64) == "int8-fp16"
    assert ops.resolve_precision("auto", torch.device("cuda"), 128) == "int8-fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.resolve_precision("auto", torch.device("cuda"), 128) == "int8-fp8"


def test_empty_query_sequence():
    q = torch.zeros(1, 2, 0, 64)
    k, v = torch.randn(1, 2, 5, 64), torch.randn(1, 2, 5, 64)
    out = sagevideo.attention(q, k, v, precision="int8-fp8")
    assert out.shape == (1, 2, 0, 64)


# ---------------------------------------------------------------------------------------- bad input errors
_q = torch.randn(1, 2, 8, 64)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(q=_q[0]), ValueError, "must be 4-D"),
        (dict(q=_q.to(torch.int32)), TypeError, "expected float16, bfloat16 or float32"),
        (dict(q=_q.double()), TypeError, "expected float16"),
        (dict(k=torch.randn(1, 2, 8, 64, dtype=torch.float16)), TypeError, "share one dtype"),
        (dict(k=torch.randn(1, 2, 9, 64)), ValueError, "same shape"),
        (dict(k=torch.randn(1, 2, 8, 32), v=torch.randn(1, 2, 8, 32)), ValueError, "head_dim"),
        (dict(k=torch.randn(2, 2, 8, 64), v=torch.randn(2, 2, 8, 64)), ValueError, "batch"),
        (dict(k=torch.randn(1, 3, 8, 64), v=torch.randn(1, 3, 8, 64)), ValueError, "multiple of k/v heads"),
        (dict(k=torch.randn(1, 2, 0, 64), v=torch.randn(1, 2, 0, 64)), ValueError, "empty sequence"),
        (dict(layout="SBHD"), ValueError, "layout must be one of"),
        (dict(precision="int4"), ValueError, "unknown precision"),
        (dict(scale=-1.0), ValueError, "positive finite"),
        (dict(key_padding_mask=torch.ones(1, 8)), TypeError, "bool tensor"),
        (dict(key_padding_mask=torch.ones(1, 1, 1, 8, dtype=torch.bool)), ValueError, r"mask.view\(B, S\)"),
        (dict(q="not a tensor"), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_input_errors(kwargs, exc, match):
    args = dict(q=_q, k=torch.randn(1, 2, 8, 64), v=torch.randn(1, 2, 8, 64))
    for name in ("q", "k", "v"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(exc, match=match):
        sagevideo.attention(args["q"], args["k"], args["v"], **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_lse_from_the_flash_kernel_is_the_true_lse(layout, dtype):
    # 16-bit dense with return_lse takes the LSE from SDPA's flash kernel (no second attention pass)
    q, k, v = structured_qkv(2, 3, 3, 300, 250, 128, dtype=dtype, device="cuda", layout=layout)
    out, lse = sagevideo.attention(q, k, v, layout=layout, precision="dense", return_lse=True)
    want_out, want_lse = exact(q, k, v, layout)
    got = lse.cpu() if layout == "BHSD" else lse.cpu().transpose(1, 2)
    torch.testing.assert_close(got, want_lse.float(), atol=2e-3, rtol=0)
    got_out = out if layout == "BHSD" else out.transpose(1, 2)
    assert error_metrics(got_out.float().cpu(), want_out.float())["rel_l1"] < 1e-2

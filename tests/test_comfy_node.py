"""The ComfyUI node against a small stand-in of ComfyUI's attention-override contract (ComfyUI is not on PyPI).

The stand-in reproduces, from ``comfy/ldm/modules/attention.py``: ``wrap_attn`` (an override in
``transformer_options["optimized_attention_override"]`` is called as ``override(func, *args, **kwargs)`` with the
undecorated backend as ``func`` and ``_inside_attn_wrapper`` in kwargs), the backend signature
``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)`` with
both layouts and mask ranks, and ``ModelPatcher.clone`` (a copy of ``model_options`` whose
``transformer_options`` dict is new, so setting a key on the clone leaves the original alone). Call sites imitate
Wan (``(B, S, H·D)``, ``grid_sizes``/``block_index``/``total_blocks``, text cross-attention, I2V image
cross-attention with ``low_precision_attention=False``) and HunyuanVideo (``skip_reshape=True`` with a
``(1, 1, S)`` additive padding mask).

Outputs of calls the schedule quantizes are compared with ``sagevideo.reference.quant_attention_ref`` (the CPU
path is forced with ``allow_cpu=True`` / ``SAGEVIDEO_COMFY_ALLOW_CPU=1``, test-only); calls that must go to
ComfyUI are checked to return exactly the default function's result.
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch

from comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfy_nodes.nodes import TEST_ALLOW_CPU_ENV, SageVideoAttention, build_config
from comfy_nodes.override import SageOverride, key_padding_mask_from_comfy, step_from_sigmas
from sagevideo import methods
from sagevideo.config import AttentionConfig, Rule
from sagevideo.methods import Method
from sagevideo.reference import quant_attention_ref

# ----------------------------------------------------------------------------------------------------------
# Stand-in of ComfyUI's contract
# ----------------------------------------------------------------------------------------------------------


def wrap_attn(func):
    """Same bookkeeping as ComfyUI's ``wrap_attn``."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        remove = False
        try:
            if "_inside_attn_wrapper" not in kwargs:
                options = kwargs.get("transformer_options", None)
                remove = True
                kwargs["_inside_attn_wrapper"] = True
                if options is not None and "optimized_attention_override" in options:
                    return options["optimized_attention_override"](func, *args, **kwargs)
            return func(*args, **kwargs)
        finally:
            if remove:
                del kwargs["_inside_attn_wrapper"]

    return wrapper


DEFAULT_CALLS = []


@wrap_attn
def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                      **kwargs):
    """ComfyUI's default backend semantics (layouts, mask ranks), recording each call."""
    DEFAULT_CALLS.append(dict(kwargs))
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, dim_head = q.shape
        dim_head //= heads
        q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask.ndim == 3:
            mask = mask.unsqueeze(1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if not skip_output_reshape:
        out = out.transpose(1, 2).reshape(b, -1, heads * dim_head)
    return out


class ModelPatcher:
    """``clone()`` semantics of comfy.model_patcher.ModelPatcher: shared model, copied options."""

    def __init__(self, diffusion_model=None):
        self.model = type("BaseModel", (), {})()
        self.model.diffusion_model = diffusion_model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher.__new__(ModelPatcher)
        n.model = self.model
        n.model_options = copy.copy(self.model_options)
        n.model_options["transformer_options"] = copy.copy(self.model_options["transformer_options"])
        return n

    def get_model_object(self, name):
        return getattr(self.model, name)


class WanModel(torch.nn.Module):
    """Attention call pattern of ComfyUI's Wan: per block self-attn, text cross-attn, I2V image cross-attn."""

    def __init__(self, blocks=3, heads=2, head_dim=32):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(blocks))
        self.heads, self.head_dim = heads, head_dim

    def forward(self, x, context, context_img, options):
        b, s, _ = x.shape
        options["grid_sizes"] = torch.Size((2, 2, s // 4))
        options["total_blocks"] = len(self.blocks)
        for i in range(len(self.blocks)):
            options["block_index"] = i
            x = x + 0.5 * attention_pytorch(x, x.roll(1, -1), x.flip(-1), heads=self.heads, transformer_options=options)
            x = x + attention_pytorch(x, context, context, heads=self.heads, transformer_options=options)
            x = x + attention_pytorch(x, context_img, context_img, heads=self.heads, transformer_options=options,
                                      low_precision_attention=False)
        return x


def _qkv(b=2, h=2, s=40, d=32, layout="BHSD", seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, s, d) if layout == "BHSD" else (b, s, h, d)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    k = k + 2.0  # a per-channel offset like real K
    return q, k, v


def _options(step=None, steps=4, block=0, total=3, grid=None):
    o = {"block_index": block, "total_blocks": total}
    if step is not None:
        sample = torch.linspace(1.0, 0.0, steps + 1)
        o["sample_sigmas"] = sample
        o["sigmas"] = sample[step : step + 1].repeat(2)
    if grid is not None:
        o["grid_sizes"] = torch.Size(grid)
    return o


def _ref(q, k, v, precision, kpm=None):
    out, _ = quant_attention_ref(q, k, v, precision=precision, key_padding_mask=kpm)
    return out


def _call(override, q, k, v, heads, *, options, skip_reshape, skip_output_reshape=False, mask=None, **kw):
    to = dict(options, optimized_attention_override=override)
    return attention_pytorch(q, k, v, heads, mask=mask, skip_reshape=skip_reshape,
                             skip_output_reshape=skip_output_reshape, transformer_options=to, **kw)


@pytest.fixture(autouse=True)
def _clear_calls():
    DEFAULT_CALLS.clear()


# ----------------------------------------------------------------------------------------------------------
# The node
# ----------------------------------------------------------------------------------------------------------


def test_node_registration_and_tooltips():
    assert NODE_CLASS_MAPPINGS == {"SageVideoAttention": SageVideoAttention}
    assert NODE_DISPLAY_NAME_MAPPINGS == {"SageVideoAttention": "Sage Attention"}
    spec = SageVideoAttention.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (_, opts) in spec[section].items():
            assert opts.get("tooltip"), f"input {name!r} has no tooltip"
    assert spec["required"]["model"][0] == "MODEL"
    assert SageVideoAttention.RETURN_TYPES == ("MODEL",)
    assert set(spec["required"]["mode"][0]) >= {"auto", "int8-fp8", "int8-fp16", "dense"}
    assert getattr(SageVideoAttention(), SageVideoAttention.FUNCTION)
    assert SageVideoAttention.CATEGORY.startswith("advanced/model_patches")


def test_node_clones_and_chains_without_mutating_input():
    previous = lambda func, *a, **kw: func(*a, **kw)  # noqa: E731
    model = ModelPatcher(WanModel())
    model.model_options["transformer_options"]["optimized_attention_override"] = previous
    before = dict(model.model_options["transformer_options"])
    (patched,) = SageVideoAttention().patch(model, mode="int8-fp8", dense_warmup=0.2, high_precision_blocks="0,-1")
    assert patched is not model
    assert model.model_options["transformer_options"] == before  # the input is untouched
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    assert isinstance(override, SageOverride) and override.previous is previous
    assert override.family == "wan" and override.num_layers == 3
    assert [r.method for r in override.config.rules] == ["dense", "int8-fp16"]


def test_build_config_precedence_and_errors():
    cfg = build_config("int8-fp16", 0.25, "1")
    assert cfg.default == "int8-fp16" and cfg.rules[0].steps == (0.0, 0.25) and cfg.rules[1].method == "dense"
    assert build_config(profile="warmup").rules[0].steps == (0.0, 0.2)
    js = AttentionConfig.uniform("int8-fp16").to_json()
    assert build_config("int8-fp8", profile="warmup", config_json=js).default == "int8-fp16"
    with pytest.raises(ValueError, match="high_precision_blocks"):
        build_config(high_precision_blocks="a,b")
    # a rule naming a block the model lacks fails when the node runs, not in the middle of sampling
    with pytest.raises(ValueError, match="layer"):
        SageVideoAttention().patch(ModelPatcher(WanModel(blocks=3)), high_precision_blocks="7")


# ----------------------------------------------------------------------------------------------------------
# The override: layouts, masks, flags, against the reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip_reshape", [False, True])
@pytest.mark.parametrize("skip_output_reshape", [False, True])
@pytest.mark.parametrize("precision", ["int8-fp8", "int8-fp16"])
def test_layouts_match_reference(skip_reshape, skip_output_reshape, precision):
    q, k, v = _qkv()  # BHSD
    b, h, s, d = q.shape
    ov = SageOverride(AttentionConfig.uniform(precision), allow_cpu=True)
    if skip_reshape:
        args = (q, k, v)
    else:
        args = tuple(t.transpose(1, 2).reshape(b, s, h * d) for t in (q, k, v))
    out = _call(ov, *args, h, options=_options(), skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape)
    ref = _ref(q, k, v, precision)
    expect = ref if skip_output_reshape else ref.transpose(1, 2).reshape(b, s, h * d)
    assert out.shape == expect.shape
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
    assert ov.calls == {"sagevideo": 1, "fallback": 0} and not DEFAULT_CALLS
    # and it is close to exact attention
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dense = dense if skip_output_reshape else dense.transpose(1, 2).reshape(b, s, h * d)
    assert (out - dense).abs().max() < 0.1


@pytest.mark.parametrize("kind", ["bool_b11s", "float_11s", "float_bs", "bool_s"])
def test_key_padding_masks(kind):
    q, k, v = _qkv(s=24)
    b, h, s, d = q.shape
    keep = torch.ones(b, s, dtype=torch.bool)
    keep[1, 17:] = False
    if kind == "bool_b11s":
        mask = keep[:, None, None, :]
    elif kind == "float_11s":  # HunyuanVideo: (1, 1, S), -finfo.max on padding
        keep[1] = keep[0]
        keep[:, 20:] = False
        mask = torch.zeros(1, 1, s).masked_fill(~keep[:1, None, :], -torch.finfo(torch.float32).max)
    elif kind == "float_bs":
        mask = torch.zeros(b, 1, s).masked_fill(~keep[:, None, :], float("-inf"))
    else:  # 2-D (1, S): broadcast over batch and queries
        keep[1] = keep[0] = True
        keep[:, 5] = False
        mask = keep[:1]
    ov = SageOverride(AttentionConfig.uniform("int8-fp16"), allow_cpu=True)
    out = _call(ov, q, k, v, h, options=_options(), skip_reshape=True, skip_output_reshape=True, mask=mask)
    torch.testing.assert_close(out, _ref(q, k, v, "int8-fp16", keep), atol=1e-5, rtol=1e-5)
    assert ov.calls["sagevideo"] == 1


def test_query_dependent_mask_goes_to_default(caplog):
    q, k, v = _qkv(s=16)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()  # depends on the query row
    ov = SageOverride(AttentionConfig.uniform("int8-fp8"), allow_cpu=True)
    with caplog.at_level(logging.WARNING, "sagevideo.comfy"):
        out = _call(ov, q, k, v, 2, options=_options(), skip_reshape=True, mask=mask)
        _call(ov, q, k, v, 2, options=_options(), skip_reshape=True, mask=mask)
    expect = attention_pytorch(q, k, v, 2, mask=mask, skip_reshape=True)
    torch.testing.assert_close(out, expect, atol=0, rtol=0)
    assert ov.calls == {"sagevideo": 0, "fallback": 2}
    assert sum("not a key-padding mask" in r.message for r in caplog.records) == 1
    assert key_padding_mask_from_comfy(torch.full((1, 1, 16), -0.5), 2, 16, 16) == (False, None)  # soft bias


def test_low_precision_flag_cross_attention_and_big_heads_go_to_default():
    ov = SageOverride(AttentionConfig.uniform("int8-fp8"), allow_cpu=True)
    q, k, v = _qkv(layout="BSHD")
    flat = [t.flatten(2) for t in (q, k, v)]
    out = _call(ov, *flat, 2, options=_options(), skip_reshape=False, low_precision_attention=False)
    torch.testing.assert_close(out, attention_pytorch(*flat, 2), atol=0, rtol=0)
    DEFAULT_CALLS.pop()
    ctx = torch.randn(2, 7, 64)  # cross-attention: K/V are the text
    _call(ov, flat[0], ctx, ctx, 2, options=_options(), skip_reshape=False)
    big = torch.randn(1, 1, 8, 256)  # head_dim above the kernel's limit
    _call(ov, big, big, big, 1, options=_options(), skip_reshape=True)
    assert ov.calls == {"sagevideo": 0, "fallback": 3} and len(DEFAULT_CALLS) == 3
    assert DEFAULT_CALLS[0]["low_precision_attention"] is False and DEFAULT_CALLS[0]["_inside_attn_wrapper"]


def test_cpu_without_test_flag_falls_back_with_one_log_line(caplog):
    ov = SageOverride(AttentionConfig.uniform("int8-fp8"))  # allow_cpu=False: the production behaviour
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, "sagevideo.comfy"):
        outs = [_call(ov, q, k, v, 2, options=_options(), skip_reshape=True) for _ in range(3)]
    expect = attention_pytorch(q, k, v, 2, skip_reshape=True)
    for o in outs:
        torch.testing.assert_close(o, expect, atol=0, rtol=0)
    lines = [r.message for r in caplog.records if "no supported GPU" in r.message]
    assert len(lines) == 1 and "default attention" in lines[0]


def test_previous_override_is_chained_when_mode_does_not_apply():
    seen = []

    def previous(func, *args, **kwargs):
        seen.append(kwargs.get("low_precision_attention", True))
        return func(*args, **kwargs) * 0 + 7.0

    cfg = AttentionConfig(default="int8-fp8", rules=(Rule("dense", steps=(0.0, 0.5)),))
    ov = SageOverride(cfg, previous, allow_cpu=True)
    q, k, v = _qkv()
    assert (_call(ov, q, k, v, 2, options=_options(step=0), skip_reshape=True) == 7).all()  # dense warm-up
    assert (_call(ov, q, k, v, 2, options=_options(step=3), skip_reshape=True) != 7).all()  # quantized
    assert (_call(ov, q, k, v, 2, options=_options(step=3), skip_reshape=True, low_precision_attention=False) == 7).all()
    assert seen == [True, False]


# ----------------------------------------------------------------------------------------------------------
# Step and layer schedule
# ----------------------------------------------------------------------------------------------------------


def test_step_from_sigmas():
    sample = torch.tensor([14.6, 6.0, 2.1, 0.7, 0.0])
    assert step_from_sigmas({"sigmas": torch.tensor([2.1, 2.1]), "sample_sigmas": sample}) == (2, 4)
    assert step_from_sigmas({"sigmas": torch.tensor([14.6]), "sample_sigmas": sample}) == (0, 4)
    assert step_from_sigmas({"sigmas": torch.tensor([3.3]), "sample_sigmas": sample}) is None  # not on the schedule
    assert step_from_sigmas({"sigmas": torch.tensor([0.0]), "sample_sigmas": sample}) is None  # the final sigma
    assert step_from_sigmas({}) is None


def test_schedule_by_step_and_block_matches_reference():
    cfg = build_config("int8-fp8", dense_warmup=0.5, high_precision_blocks="0")
    ov = SageOverride(cfg, num_layers=3, allow_cpu=True)
    q, k, v = _qkv()
    dense = attention_pytorch(q, k, v, 2, skip_reshape=True, skip_output_reshape=True)
    for step in range(4):
        for block in range(3):
            out = _call(ov, q, k, v, 2, options=_options(step=step, block=block), skip_reshape=True,
                        skip_output_reshape=True)
            if step < 2:
                expect = dense
            else:
                expect = _ref(q, k, v, "int8-fp16" if block == 0 else "int8-fp8")
            torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5, msg=f"step {step} block {block}")
    assert ov.observed[(0, 1)] == "dense(comfy)" and ov.observed[(2, 0)] == "int8-fp16" and ov.observed[(3, 2)] == "int8-fp8"
    # same decisions as the schedule the diffusers patcher uses
    from sagevideo.schedule import Schedule

    sched = Schedule(cfg, 3)
    for (step, layer), label in ov.observed.items():
        (choice,) = sched.resolve(step, 4, layer, (0, 1))
        assert label == ("dense(comfy)" if choice.method == "dense" else choice.label)


def test_unknown_step_with_step_rule_does_not_raise(caplog):
    ov = SageOverride(build_config("int8-fp8", dense_warmup=0.2), allow_cpu=True)
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, "sagevideo.comfy"):
        out = _call(ov, q, k, v, 2, options=_options(step=None), skip_reshape=True)
    torch.testing.assert_close(out, attention_pytorch(q, k, v, 2, skip_reshape=True), atol=0, rtol=0)
    assert any("cannot resolve" in r.message for r in caplog.records)


def test_hunyuan_single_blocks_follow_double_blocks():
    cfg = AttentionConfig(default="int8-fp8", rules=(Rule("int8-fp16", layers=(-1,)),))
    ov = SageOverride(cfg, num_layers=4, allow_cpu=True)  # the node counts double + single blocks
    q, k, v = _qkv()
    for block_type, index, total in (("double", 0, 2), ("double", 1, 2), ("single", 0, 2), ("single", 1, 2)):
        opts = dict(_options(), block_index=index, total_blocks=total, block_type=block_type)
        _call(ov, q, k, v, 2, options=opts, skip_reshape=True)
    assert ov.observed == {(None, 0): "int8-fp8", (None, 1): "int8-fp8", (None, 2): "int8-fp8", (None, 3): "int8-fp16"}


def test_guard_recomputes_non_finite_output_with_default():
    methods.register(Method("nan-test", lambda q, k, v, ctx: (q * float("nan"), None), cost=0.5))
    try:
        ov = SageOverride(AttentionConfig.uniform("nan-test"), allow_cpu=True)
        q, k, v = _qkv()
        with pytest.warns(RuntimeWarning, match="not finite"):
            out = _call(ov, q, k, v, 2, options=_options(), skip_reshape=True)
        torch.testing.assert_close(out, attention_pytorch(q, k, v, 2, skip_reshape=True), atol=0, rtol=0)
        assert ov.guard.count == 1
    finally:
        methods.unregister("nan-test")


# ----------------------------------------------------------------------------------------------------------
# End to end through the node and a Wan-shaped call pattern
# ----------------------------------------------------------------------------------------------------------


def test_wan_pattern_end_to_end(monkeypatch):
    monkeypatch.setenv(TEST_ALLOW_CPU_ENV, "1")
    torch.manual_seed(0)
    net = WanModel(blocks=3, heads=2, head_dim=32)
    model = ModelPatcher(net)
    (patched,) = SageVideoAttention().patch(model, mode="int8-fp16")
    x, ctx, img = torch.randn(2, 16, 64), torch.randn(2, 9, 64), torch.randn(2, 5, 64)
    base = net(x, ctx, img, copy.copy(model.model_options["transformer_options"]))
    DEFAULT_CALLS.clear()
    out = net(x, ctx, img, copy.copy(patched.model_options["transformer_options"]))
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    assert override.calls == {"sagevideo": 3, "fallback": 6}  # self-attention only
    assert len(DEFAULT_CALLS) == 6
    assert (out - base).abs().max() < 0.05 * base.abs().max()
    assert "optimized_attention_override" not in model.model_options["transformer_options"]


def test_layer_counted_when_comfy_gives_no_block_index():
    # ComfyUI before ~v0.3.65 sets neither block_index nor total_blocks; every model call copies transformer_options
    cfg = build_config("int8-fp8", high_precision_blocks="-1")
    ov = SageOverride(cfg, num_layers=3, allow_cpu=True)
    q, k, v = _qkv()
    text = torch.randn(2, 2, 8, 32)
    for _forward in range(2):
        options = {"optimized_attention_override": ov}  # one dict per model call, as ComfyUI does
        attention_pytorch(text, text, text, 2, skip_reshape=True, transformer_options=options)  # text refiner
        for _block in range(3):
            attention_pytorch(q, k, v, 2, skip_reshape=True, transformer_options=options)
    assert ov.observed == {(None, 0): "int8-fp8", (None, 1): "int8-fp8", (None, 2): "int8-fp16"}
    # without the block count a per-block rule cannot be resolved: ComfyUI's attention, no exception
    ov = SageOverride(cfg, allow_cpu=True)
    out = _call(ov, q, k, v, 2, options={}, skip_reshape=True)
    torch.testing.assert_close(out, attention_pytorch(q, k, v, 2, skip_reshape=True), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("skip_reshape", [False, True])
def test_supported_gpu_runs_kernel(skip_reshape):
    """On a CUDA GPU the override runs the Triton kernel (no test switch) and matches the reference."""
    q, k, v = (t.cuda().half() for t in _qkv(s=200, d=64))
    b, h, s, d = q.shape
    ov = SageOverride(AttentionConfig.uniform("int8-fp16"))
    args = (q, k, v) if skip_reshape else tuple(t.transpose(1, 2).reshape(b, s, h * d) for t in (q, k, v))
    out = _call(ov, *args, h, options=_options(), skip_reshape=skip_reshape, skip_output_reshape=True)
    assert ov.calls == {"sagevideo": 1, "fallback": 0}
    want = _ref(q.float().cpu(), k.float().cpu(), v.float().cpu(), "int8-fp16")
    rel_l1 = (out.float().cpu() - want).abs().sum() / want.abs().sum()
    assert rel_l1 < 2e-2, rel_l1


def test_override_survives_deepcopy_of_model_options():
    model = ModelPatcher(WanModel())
    (patched,) = SageVideoAttention().patch(model)
    copied = copy.deepcopy(patched.model_options)
    assert copied["transformer_options"]["optimized_attention_override"] is \
        patched.model_options["transformer_options"]["optimized_attention_override"]


def test_sparse_mode_uses_comfy_grid_and_keeps_state_in_the_override():
    from sagevideo.sparse.api import sparse_attention

    q, k, v = _qkv(b=1, h=2, s=48, d=32)
    params = {"precision": "dense", "top_p": 0.5, "q_clusters": 4, "k_clusters": 6, "block_m": 16, "block_n": 16}
    ov = SageOverride(AttentionConfig(default="sparse-semantic", default_params=params), allow_cpu=True,
                      family="wan")
    out = _call(ov, q, k, v, 2, options=_options(step=2, grid=(3, 4, 4)), skip_reshape=True,
                skip_output_reshape=True)
    kw = {key: val for key, val in params.items()}
    want = sparse_attention(q, k, v, grid=(3, 4, 4), method="semantic", seed=0, **kw)
    torch.testing.assert_close(out, want)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (out - dense).abs().max() > 1e-4  # really sparse
    (state,) = ov.store.values()
    assert state.calls == 1 and state.last_density < 1.0
    # without a grid (e.g. HunyuanVideo in ComfyUI) the mode runs the dense op of its precision instead
    ov2 = SageOverride(AttentionConfig(default="sparse-semantic", default_params=params), allow_cpu=True)
    out2 = _call(ov2, q, k, v, 2, options=_options(step=2), skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(out2, dense, atol=1e-5, rtol=1e-5)
    assert ov2.store == {}


def test_wan_grid_wrapper_supplies_the_grid_and_chains():
    # ComfyUI before late 2025 does not put grid_sizes into transformer_options; the node's model wrapper does
    net = WanModel()
    net.patch_size = (1, 2, 2)
    model = ModelPatcher(net)
    seen = []

    def previous(apply_model, args):
        seen.append("previous")
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.model_options["model_function_wrapper"] = previous
    (patched,) = SageVideoAttention().patch(model, mode="sparse-semantic")
    assert model.model_options["model_function_wrapper"] is previous  # the input model is untouched
    wrapper = patched.model_options["model_function_wrapper"]

    def apply_model(x, t, transformer_options=None, **kw):
        seen.append(transformer_options.get("grid_sizes"))
        return x

    x = torch.zeros(1, 16, 3, 7, 10)  # odd sizes: ComfyUI pads to the patch, so the grid rounds up
    wrapper(apply_model, {"input": x, "timestep": torch.zeros(1), "c": {"transformer_options": {}}})
    assert seen == ["previous", (3, 4, 5)]
    seen.clear()
    given = {"transformer_options": {"grid_sizes": (9, 9, 9)}}
    wrapper(apply_model, {"input": x, "timestep": torch.zeros(1), "c": given})
    assert seen == ["previous", (9, 9, 9)]  # a grid the model provides wins
    assert given == {"transformer_options": {"grid_sizes": (9, 9, 9)}}  # and the caller's dict is not written
    # patching the patched model again does not stack a second grid wrapper
    (again,) = SageVideoAttention().patch(patched, mode="int8-fp8")
    assert again.model_options["model_function_wrapper"] is wrapper

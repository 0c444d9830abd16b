"""Calibration on the tiny Wan model: the schedule it writes meets its target, checked independently."""

import pytest
import torch

from sagevideo.calibration import calibrate
from sagevideo.config import AttentionConfig
from sagevideo.patching import patch_pipeline
from sagevideo.reference import quant_attention_ref
from tests import tiny_pipelines as tp

WAN = "dispatch:diffusers.models.transformers.transformer_wan"
PROMPTS = ["a cat walks on the grass", "a boat sails across a calm lake"]
BUCKETS = tp.NUM_STEPS  # one step per bucket


@pytest.fixture(scope="module")
def wan():
    return tp.wan_pipeline()


def run_kwargs(pipe):
    kwargs = tp.call_kwargs(pipe)
    kwargs.pop("prompt")
    kwargs.pop("generator")
    return kwargs


def calib(pipe, target, **kw):
    return calibrate(pipe, PROMPTS, target=target, num_buckets=BUCKETS, generator=torch.Generator().manual_seed(0),
                     **run_kwargs(pipe), **kw)


def worst_head_rel_l1(out, ref):
    """rel-L1 per head (BHSD), worst head — written out here, not taken from sagevideo."""
    num = (out.double() - ref.double()).abs().sum(dim=(0, 2, 3))
    return float((num / ref.double().abs().sum(dim=(0, 2, 3))).max())


def dense_activations(pipe):
    """(step, layer, q, k, v, mask, dense out) of every self-attention call of dense runs of PROMPTS."""
    modules = [b.attn1 for b in pipe.transformer.blocks]
    generator = torch.Generator().manual_seed(0)  # calibrate() passes one generator to every prompt's run
    captured = []
    for prompt in PROMPTS:
        _, ref = tp.reference_run(pipe, WAN, modules, lambda s, l: "dense", capture=True, prompt=prompt,
                                  generator=generator)
        captured += ref.captured
    return captured


def test_calibrated_schedule_meets_its_target(wan, tmp_path):
    probe = calib(wan, target=1.0)
    fp8 = sorted(e["int8-fp8"] for e in probe.errors.values())
    target = fp8[len(fp8) // 2]  # half the cells can take int8-fp8
    path = tmp_path / "schedule.json"
    result = calib(wan, target=target, out=str(path))

    # written, reloadable, self-describing
    loaded = AttentionConfig.load(path)
    assert loaded == result.config and loaded.family == "wan"
    meta = loaded.meta["calibration"]
    assert meta["target"] == target and meta["seconds"] > 0 and meta["attention_calls"] == result.calls
    assert result.calls == len(PROMPTS) * tp.NUM_STEPS * 2 * tp.LAYERS
    assert set(result.choices.values()) >= {"int8-fp8", "int8-fp16"}

    # independent check: every dense-run call, with the method chosen for its (step, layer), is within target;
    # and int8-fp8 (the cheapest) was refused only where it misses the target on some call
    fp8_worst = {}
    for step, layer, q, k, v, kpm, ref in dense_activations(wan):
        key = (step * BUCKETS // tp.NUM_STEPS, layer)
        choice = result.choices[key]
        if choice != "dense":
            out = quant_attention_ref(q, k, v, precision=choice)[0]
            assert worst_head_rel_l1(out, ref) <= target * (1 + 1e-9), (key, choice)
        err = worst_head_rel_l1(quant_attention_ref(q, k, v, precision="int8-fp8")[0], ref)
        fp8_worst[key] = max(fp8_worst.get(key, 0.0), err)
    for key, choice in result.choices.items():
        assert (choice == "int8-fp8") == (fp8_worst[key] <= target * (1 + 1e-9)), key
        torch.testing.assert_close(result.errors[key]["int8-fp8"], fp8_worst[key], rtol=1e-9, atol=0)

    # the schedule drives a patched run: observed choice per (step, layer) = calibrated choice of its cell
    with patch_pipeline(wan, loaded) as handle:
        tp.run(wan)
        observed = handle.observed["transformer"]
    assert observed == {(s, l): result.choices[(s * BUCKETS // tp.NUM_STEPS, l)]
                        for s in range(tp.NUM_STEPS) for l in range(tp.LAYERS)}


def test_target_extremes(wan):
    strict = calib(wan, target=0.0)
    assert strict.config.default == "dense" and strict.config.rules == ()
    loose = calib(wan, target=10.0)
    assert loose.config.default == "int8-fp8" and loose.config.rules == ()
    assert "s —" in loose.summary() and loose.seconds > 0


def test_two_experts_are_measured_together():
    pipe = tp.wan_pipeline(two_experts=True)
    result = calibrate(pipe, PROMPTS[0], target=1.0, num_buckets=2, **run_kwargs(pipe))
    assert result.calls == tp.NUM_STEPS * 2 * tp.LAYERS  # each step runs one expert, twice (CFG)
    assert set(result.choices) == {(b, l) for b in range(2) for l in range(tp.LAYERS)}


def test_query_sampling_is_exact_for_row_local_methods(wan):
    """The quantized methods give a sampled query row the output it gets in the full call (up to the float
    summation order of a matmul with fewer rows)."""
    from sagevideo import methods

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 200, 32, generator=g) for _ in range(3))
    k = k + 4 * torch.randn(1, 2, 1, 32, generator=g)  # a per-channel offset, as real K has
    rows = torch.tensor([0, 5, 63, 64, 150, 199])
    for name in ("int8-fp8", "int8-fp16"):
        assert methods.get(name).row_local
        full = quant_attention_ref(q, k, v, precision=name)[0]
        part = quant_attention_ref(q[:, :, rows], k, v, precision=name)[0]
        torch.testing.assert_close(part, full[:, :, rows], rtol=1e-6, atol=1e-7)
    sampled = calib(wan, target=1.0, query_sample=16)
    assert set(sampled.errors) == {(b, l) for b in range(BUCKETS) for l in range(tp.LAYERS)}


def test_bad_arguments(wan):
    with pytest.raises(ValueError, match="metric"):
        calibrate(wan, PROMPTS, metric="psnr")
    with pytest.raises(ValueError, match="fallback"):
        calibrate(wan, PROMPTS, candidates=("dense",))
    with pytest.raises(ValueError, match="unknown attention method"):
        calibrate(wan, PROMPTS, candidates=("int9",))
    with pytest.raises(ValueError, match="prompts"):
        calibrate(wan, [])
    with pytest.raises(ValueError, match="target"):
        calibrate(wan, PROMPTS, target=-1)

"""The schedule config (versioned, JSON), its resolution per (step, layer, head), the step tracker, profiles.

No diffusers import here except in the last test: these run in well under a second.
"""

import json

import pytest
import torch

from sagevideo import methods, profiles
from sagevideo.config import CONFIG_VERSION, AttentionConfig, Rule, StepUnknownError
from sagevideo.schedule import Choice, Schedule, StepTracker

EXAMPLE = AttentionConfig(
    default="int8-fp8", rules=(Rule("dense", steps=(0.0, 0.2)), Rule("int8-fp16", layers=(0, 1)))
)


# ----------------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------------


def test_json_round_trip_and_format():
    cfg = AttentionConfig(
        default="auto", default_params={"smooth_v": True},
        rules=(Rule("dense", steps=(0, 0.25)), Rule("int8-fp16", layers=(0, -1), heads=(3,), params={"smooth_v": True})),
        guard=False, family="wan", meta={"note": "x", "n": [1, 2]},
    )
    text = cfg.to_json()
    data = json.loads(text)
    assert data["version"] == CONFIG_VERSION
    assert data["rules"][0] == {"method": "dense", "steps": [0.0, 0.25]}
    assert data["rules"][1] == {"method": "int8-fp16", "params": {"smooth_v": True}, "layers": [0, -1], "heads": [3]}
    back = AttentionConfig.from_json(text)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert back.rules[0].steps == (0.0, 0.25) and back.default_params["smooth_v"] is True


def test_save_load(tmp_path):
    p = tmp_path / "s.json"
    EXAMPLE.save(p)
    assert AttentionConfig.load(p) == EXAMPLE


@pytest.mark.parametrize(
    "data, error, match",
    [
        ({"default": "dense"}, ValueError, "no 'version'"),
        ({"version": 99}, ValueError, "newer than this sagevideo"),
        ({"version": 0}, ValueError, ">= 1"),
        ({"version": 1, "defualt": "dense"}, ValueError, r"unknown key\(s\) \['defualt'\]"),
        ({"version": 1, "default": "int4"}, ValueError, "unknown attention method 'int4'.*int8-fp8"),
        ({"version": 1, "rules": [{"method": "dense", "step": [0, 1]}]}, ValueError, r"unknown key\(s\) \['step'\]"),
        ({"version": 1, "rules": [{"steps": [0, 1]}]}, ValueError, "no 'method'"),
        ({"version": 1, "rules": [{"method": "dense", "steps": [0.5, 0.2]}]}, ValueError, "0 <= start < end <= 1"),
        ({"version": 1, "rules": [{"method": "dense", "steps": [0, 2]}]}, ValueError, "0 <= start < end <= 1"),
        ({"version": 1, "rules": [{"method": "dense", "steps": 0.2}]}, TypeError, r"\(start, end\)"),
        ({"version": 1, "rules": [{"method": "dense", "layers": []}]}, ValueError, "empty"),
        ({"version": 1, "rules": [{"method": "dense", "layers": [1, 1]}]}, ValueError, "duplicates"),
        ({"version": 1, "rules": [{"method": "dense", "layers": ["0"]}]}, TypeError, "ints"),
        ({"version": 1, "rules": [{"method": "dense", "heads": [-1]}]}, ValueError, "non-negative"),
        ({"version": 1, "rules": [{"method": "int8-fp8", "params": {"smoothv": True}}]}, ValueError, "no parameter"),
        ({"version": 1, "rules": [{"method": "int8-fp8", "params": {"smooth_v": 1}}]}, TypeError, "must be bool"),
        ({"version": 1, "rules": {}}, TypeError, "must be a list"),
        ({"version": 1, "guard": "yes"}, TypeError, "guard"),
        ({"version": 1, "meta": {"t": object()}}, TypeError, "JSON-serialisable"),
        ("[]", TypeError, "JSON object"),
    ],
)
def test_invalid_configs_are_rejected_with_clear_errors(data, error, match):
    with pytest.raises(error, match=match):
        if isinstance(data, str):
            AttentionConfig.from_json(data)
        else:
            AttentionConfig.from_dict(data)


def test_load_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"version": 1, "default": "nope"}')
    with pytest.raises(ValueError, match="bad.json: unknown attention method"):
        AttentionConfig.load(p)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AttentionConfig.load(p)


# ----------------------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------------------


def test_example_schedule_resolution():
    sched = Schedule(EXAMPLE, num_layers=4)
    heads = (0, 1)
    table = {(s, l): sched.resolve(s, 10, l, heads)[0].method for s in range(10) for l in range(4)}
    for (s, l), m in table.items():
        assert m == ("dense" if s < 2 else "int8-fp16" if l < 2 else "int8-fp8"), (s, l)
    # the same fractions for another step count: 20 % of 30 steps = steps 0-5
    assert [sched.resolve(s, 30, 3, heads)[0].method for s in (5, 6)] == ["dense", "int8-fp8"]


def test_negative_layers_and_out_of_range_layers():
    cfg = AttentionConfig(default="int8-fp8", rules=(Rule("int8-fp16", layers=(-1,)),))
    sched = Schedule(cfg, num_layers=3)
    assert [sched.resolve(None, None, l, (0,))[0].method for l in range(3)] == ["int8-fp8", "int8-fp8", "int8-fp16"]
    with pytest.raises(ValueError, match="names layer 5, but the model has 3"):
        Schedule(AttentionConfig(rules=(Rule("dense", layers=(5,)),)), num_layers=3)


def test_per_head_rules_partition_heads():
    cfg = AttentionConfig(default="int8-fp8", rules=(Rule("int8-fp16", heads=(1, 3)), Rule("dense", heads=(0,), layers=(0,))))
    sched = Schedule(cfg, num_layers=2)
    out = sched.resolve(0, 4, 0, (0, 1, 2, 3))
    assert {c.method: c.heads for c in out} == {"dense": (0,), "int8-fp16": (1, 3), "int8-fp8": (2,)}
    # a Ulysses rank holding heads 2-3 only
    assert {c.method: c.heads for c in sched.resolve(0, 4, 1, (2, 3))} == {"int8-fp8": (2,), "int8-fp16": (3,)}
    # all heads agree: one choice covering every head
    assert sched.resolve(0, 4, 1, (1, 3)) == (Choice("int8-fp16", {"smooth_v": False}),)


def test_step_rule_with_unknown_step_raises():
    sched = Schedule(EXAMPLE, num_layers=2)
    with pytest.raises(StepUnknownError, match="set_step"):
        sched.resolve(None, None, 0, (0,))
    # a step-free config resolves without a step
    assert Schedule(AttentionConfig.uniform("int8-fp16"), 2).resolve(None, None, 0, (0,))[0].method == "int8-fp16"


def test_labels():
    assert Choice("int8-fp8", {"smooth_v": False}).label == "int8-fp8"
    assert Choice("int8-fp8", {"smooth_v": True}, (0, 2)).label == "int8-fp8(smooth_v=True)[h0,2]"


# ----------------------------------------------------------------------------------------------------------
# Step tracking
# ----------------------------------------------------------------------------------------------------------


class _Sched:
    """A scheduler stand-in: timesteps, with or without a step_index attribute."""

    def __init__(self, timesteps):
        self.timesteps = torch.tensor(timesteps)


class _IndexedSched(_Sched):
    _step_index = None

    @property
    def step_index(self):
        return self._step_index


def test_tracker_uses_step_index_when_the_scheduler_keeps_one():
    s = _IndexedSched([999.0, 750.0, 500.0, 250.0])
    tr = StepTracker(lambda: s)
    assert tr.position(lambda: 999.0) == (0, 4)  # step_index None before the first scheduler.step: by value
    s._step_index = 2
    assert tr.position(lambda: pytest.fail("the value is not needed")) == (2, 4)


def test_tracker_by_value_with_cfg():
    """Schedulers without step_index (CogVideoX's DDIM/DPM): two calls per step at the same timestep."""
    tr = StepTracker(lambda: _Sched([900, 600, 300]))
    seen = [tr.position(lambda t=t: float(t)) for t in (900, 900, 600, 600, 300, 300)]
    assert [p[0] for p in seen] == [0, 0, 1, 1, 2, 2]
    # a new run (the timestep goes up) starts again at step 0
    assert tr.position(lambda: 900.0) == (0, 3)


def test_tracker_bf16_rounded_timestep_and_unknowns():
    ts = [999.0, 987.3, 960.1]
    tr = StepTracker(lambda: _Sched(ts))
    assert tr.position(lambda: float(torch.tensor(987.3).bfloat16())) == (1, 3)  # 988 in bf16
    assert tr.position(lambda: 10.0) is None  # far from every timestep
    assert StepTracker(None).position(lambda: 1.0) is None
    tr.set_step(4, 10)
    assert tr.position(lambda: 1.0) == (4, 10)
    with pytest.raises(ValueError, match="0 <= step < num_steps"):
        tr.set_step(10, 10)


# ----------------------------------------------------------------------------------------------------------
# Methods registry, profiles, per-model defaults
# ----------------------------------------------------------------------------------------------------------


def test_method_registry():
    assert {"dense", "int8-fp16", "int8-fp8", "auto"} <= set(methods.names())
    assert methods.get("int8-fp8").cost < methods.get("int8-fp16").cost < methods.get("dense").cost
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("dense", lambda q, k, v, ctx: (q, None), cost=1.0))
    with pytest.raises(ValueError, match="positive"):
        methods.Method("x", lambda *a: None, cost=0)
    assert methods.validate_params("int8-fp8", {}) == {"smooth_v": False}


def test_builtin_method_runs_the_op():
    from sagevideo.context import AttentionContext, TokenLayout
    from sagevideo.reference import quant_attention_ref

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 70, 2, 16, generator=g) for _ in range(3))  # BSHD
    ctx = AttentionContext(step=0, num_steps=1, layer=0, num_layers=1, layout=TokenLayout(), tensor_layout="BSHD",
                           heads=(0, 1), params={"smooth_v": True})
    out, lse = methods.get("int8-fp16").fn(q, k, v, ctx)
    ref = quant_attention_ref(*(t.transpose(1, 2) for t in (q, k, v)), precision="int8-fp16", smooth_v=True)[0]
    assert lse is None and torch.equal(out, ref.transpose(1, 2))


def test_every_profile_loads_and_documents_itself():
    names = profiles.names()
    assert {"sage-fp8", "sage-fp16", "warmup", "edges-fp16", "dense"} <= set(names)
    for name in names:
        cfg = profiles.load(name)
        assert isinstance(cfg, AttentionConfig) and cfg.meta.get("description"), name
        assert AttentionConfig.from_json(cfg.to_json()) == cfg
    warm = Schedule(profiles.load("warmup"), num_layers=3)
    assert [warm.resolve(s, 10, 2, (0,))[0].method for s in (1, 2)] == ["dense", "int8-fp8"]
    with pytest.raises(ValueError, match="no attention profile named 'fastest'; available: dense"):
        profiles.load("fastest")
    with pytest.raises(ValueError, match="profile names"):
        profiles.load("../secrets")


def test_per_family_defaults():
    from sagevideo.config import default_config

    for family in ("wan", "hunyuan_video", "hunyuan_video15", "cogvideox"):
        assert default_config(family).default == "auto"
    assert default_config("cogvideox").default_params["smooth_v"] is True
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        default_config("flux")


def test_method_config_adds_the_family_warmup_only_for_methods_that_ask():
    from sagevideo import methods
    from sagevideo.config import method_config
    from sagevideo.patching import family_spec

    plain = method_config("wan", "int8-fp8", smooth_v=True)
    assert plain.default == "int8-fp8" and plain.rules == () and plain.default_params["smooth_v"] is True

    def fn(q, k, v, ctx):
        return methods.get("dense").fn(q, k, v, ctx)

    methods.register(methods.Method("test-warm", fn, cost=0.3, needs_warmup=True))
    try:
        for family in ("wan", "hunyuan_video", "cogvideox"):
            fraction, layers = family_spec(family).sparse_warmup
            cfg = method_config(family, "test-warm")
            assert cfg.default == "test-warm"
            assert [(r.method, r.steps, r.layers) for r in cfg.rules] == [
                ("auto", (0.0, fraction), None), ("auto", None, layers)]
        assert family_spec("hunyuan_video").sparse_warmup[0] < family_spec("wan").sparse_warmup[0]
        generic = method_config(None, "test-warm")
        assert [(r.steps, r.layers) for r in generic.rules] == [((0.0, 0.2), None), (None, (0,))]
    finally:
        methods.unregister("test-warm")

"""diffusers' attention registry is private API: fail loudly when what sagevideo relies on changes."""

import importlib

import diffusers
import pytest
from diffusers.models import attention_dispatch as ad

from sagevideo.patching import FAMILIES, TESTED_DIFFUSERS, _backend_member, check_diffusers_internals, family_spec


def _version_tuple(v: str):
    return tuple(int(x) for x in v.split(".")[:2])


def test_installed_diffusers_is_in_the_tested_range():
    low, high = (_version_tuple(b.lstrip("<>=")) for b in TESTED_DIFFUSERS)
    assert low <= _version_tuple(diffusers.__version__) < high, (
        f"diffusers {diffusers.__version__} is outside the range sagevideo's patching was tested with "
        f"({','.join(TESTED_DIFFUSERS)}): rerun these tests and update the pin"
    )


def test_internals_present_and_backend_registered():
    check_diffusers_internals()
    member = _backend_member()
    assert ad.AttentionBackendName("sagevideo") is member and member.value == "sagevideo"
    assert ad._AttentionBackendRegistry._backends[member].__name__ == "_dispatch_backend"
    assert "sagevideo" in ad._AttentionBackendRegistry._supports_context_parallel
    # the dispatcher keeps only arguments the backend declares: these must survive
    assert {"attn_mask", "scale", "_parallel_config", "return_lse"} <= ad._AttentionBackendRegistry._supported_arg_names[member]
    # registering again (a second process-wide call) is idempotent
    assert _backend_member() is member


@pytest.mark.parametrize(
    "target, attr",
    [
        (ad._AttentionBackendRegistry, "_supports_context_parallel"),
        (ad._AttentionBackendRegistry, "_supported_arg_names"),
        (ad, "_templated_context_parallel_attention"),
        (ad.AttentionBackendName, "_value2member_map_"),
    ],
)
def test_a_changed_internal_fails_loudly(monkeypatch, target, attr):
    monkeypatch.delattr(target, attr)
    with pytest.raises(RuntimeError, match=f"(?s)changed private internals.*{attr}"):
        check_diffusers_internals()


def test_every_family_names_classes_that_exist():
    """Pipelines, transformers and processors the family files name are diffusers' own, with the hooks the
    backend route needs (``_attention_backend``, ``_parallel_config``) on the processors."""
    from diffusers.models import attention_processor

    for name in FAMILIES:
        spec = family_spec(name)
        for cls in spec.pipelines + spec.transformers:
            assert hasattr(diffusers, cls), f"{name}: diffusers has no {cls}"
        for proc in spec.processors:
            module = {
                "WanAttnProcessor": "diffusers.models.transformers.transformer_wan",
                "HunyuanVideoAttnProcessor2_0": "diffusers.models.transformers.transformer_hunyuan_video",
                "HunyuanVideo15AttnProcessor2_0": "diffusers.models.transformers.transformer_hunyuan_video15",
            }.get(proc)
            cls = getattr(importlib.import_module(module), proc) if module else getattr(attention_processor, proc)
            if spec.route == "backend":
                assert hasattr(cls, "_attention_backend") and hasattr(cls, "_parallel_config"), proc

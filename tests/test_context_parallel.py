"""Context parallelism (diffusers ``ContextParallelConfig``) on a patched tiny Wan: two gloo processes on CPU.

Both processes build the same seeded transformer, patch it, call ``enable_parallelism`` with Ulysses (2) or Ring
(2) and run one forward; the results are compared with the single-process patched forward.

* Ulysses: each rank attends over the full sequence with its half of the heads, so every per-head quantity
  (per-token Q scales, K mean, V scales) is the single-process one: the output must match it (and a per-head
  rule must see *global* head indices).
* Ring: each rank attends its queries to one KV chunk at a time and diffusers merges the chunks with the LSE the
  op returns. Dense must match the single process to float rounding. Quantized modes quantize each KV chunk with
  its own statistics, so they cannot match bit for bit; the merged result's error against dense must stay of
  the size of the single-process quantization error (within 2×; a wrong LSE misweights whole chunks).

diffusers 0.42.1 builds the device as ``rank % torch.accelerator.device_count()``, which divides by zero on a
machine without accelerators; the workers report one device to get past that line (the mesh is a CPU/gloo one).
"""

import os
import socket

import pytest
import torch

from sagevideo.config import AttentionConfig, Rule
from tests import tiny_pipelines as tp

CONFIGS = {
    "dense": AttentionConfig.uniform("dense"),
    "int8-fp8": AttentionConfig.uniform("int8-fp8"),
    # step 3 of 4: layers 0-1 int8-fp16, layer 2 int8-fp8; and head 1 of the last layer int8-fp16
    "schedule": AttentionConfig(default="int8-fp8", rules=(
        Rule("dense", steps=(0.0, 0.5)), Rule("int8-fp16", layers=(0, 1)), Rule("int8-fp16", heads=(1,)),
    )),
}
MODES = ("ulysses", "ring")


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)  # 3 × 4 × 6 = 72 tokens, 36 per rank
    enc = torch.randn(1, tp.TEXT_LEN, 32, generator=g)
    return x, torch.tensor([600.0]), enc


def _forward(config, parallel=None):
    from sagevideo.patching import patch_transformer

    tr = tp.wan_transformer()
    handle = patch_transformer(tr, config)
    handle.set_step(3, 4)
    if parallel is not None:
        tr.enable_parallelism(config=parallel)
    with torch.no_grad():
        out = tr(*_inputs(), return_dict=False)[0]
    observed = handle.observed["transformer"]
    handle.unpatch()
    return out, observed


def _worker(rank, world, port, result_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from diffusers import ContextParallelConfig

        results = {}
        for mode in MODES:
            for name, cfg in CONFIGS.items():
                results[(mode, name)] = _forward(cfg, ContextParallelConfig(**{f"{mode}_degree": world}))
            with tp.RecordContexts() as seen:
                _forward(AttentionConfig.uniform(tp.RecordContexts.NAME), ContextParallelConfig(**{f"{mode}_degree": world}))
            results[(mode, "contexts")] = [(c.layer, c.heads, c.ring, c.layout.grid) for c in seen]
        results["ulysses_anything"] = _ulysses_anything_heads()
        torch.save(results, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ulysses_anything_heads():
    """3 heads over 2 Ulysses ranks (``ulysses_anything``): the heads each rank's calls are told they hold."""
    from diffusers import ContextParallelConfig, WanTransformer3DModel

    from sagevideo.patching import patch_transformer

    torch.manual_seed(0)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()
    with tp.RecordContexts() as seen, torch.no_grad():
        handle = patch_transformer(tr, AttentionConfig.uniform(tp.RecordContexts.NAME))
        tr.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, ulysses_anything=True))
        tr(*_inputs(), return_dict=False)
        handle.unpatch()
    return [c.heads for c in seen]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend")
    result_dir = str(tmp_path_factory.mktemp("cp"))
    mp.spawn(_worker, args=(2, _free_port(), result_dir), nprocs=2, join=True)
    return [torch.load(os.path.join(result_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    return {name: _forward(cfg) for name, cfg in CONFIGS.items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ulysses_matches_single_process(results, single, name):
    expected, observed = single[name]
    for rank in range(2):
        out, obs = results[rank][("ulysses", name)]
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        if name == "schedule":  # each rank holds one head of the last layer's per-head split
            observed = {**observed, (3, 2): ("int8-fp8", "int8-fp16")[rank]}
        assert obs == observed


def test_ulysses_ranks_see_global_heads(results):
    for rank in range(2):
        contexts = results[rank][("ulysses", "contexts")]
        assert {c[1] for c in contexts} == {(rank,)}  # 2 heads over 2 ranks: rank r holds head r
        assert all(c[2] is None and c[3] == (3, 4, 6) for c in contexts)


def test_ulysses_anything_uneven_heads_get_their_global_indices(results):
    # diffusers pads 3 heads to 4: rank 0 holds heads 0-1, rank 1 holds head 2 (not head 1)
    assert set(results[0]["ulysses_anything"]) == {(0, 1)}
    assert set(results[1]["ulysses_anything"]) == {(2,)}


def test_ring_dense_matches_single_process(results, single):
    for rank in range(2):
        out, _ = results[rank][("ring", "dense")]
        torch.testing.assert_close(out, single["dense"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8-fp8", "schedule"])
def test_ring_quantized_stays_within_quantization_error(results, single, name):
    expected, observed = single[name]
    dense = single["dense"][0]
    quant_err = (expected - dense).abs().max()
    assert quant_err > 0
    for rank in range(2):
        out, obs = results[rank][("ring", name)]
        assert obs == observed
        ring_err = (out - dense).abs().max()
        # quantizing per KV chunk changes the rounding, not its size
        assert 0 < ring_err <= 2 * quant_err, f"ring {name}: error {ring_err:.3g} vs single-process {quant_err:.3g}"


def test_ring_chunks_are_described(results):
    for rank in range(2):
        contexts = results[rank][("ring", "contexts")]
        # per layer: one call per KV chunk, first its own keys, then the other rank's
        assert len(contexts) == 2 * tp.LAYERS
        assert [(c[0], c[2].kv_rank) for c in contexts[:2]] == [(0, rank), (0, 1 - rank)]
        assert all(c[2].rank == rank and c[2].world == 2 and c[1] == (0, 1) for c in contexts)

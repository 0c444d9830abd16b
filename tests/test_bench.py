"""``sagevideo.bench`` pieces that run without a GPU: the sparse modes' rows (timed with a wall clock here, the
quantized arithmetic as its torch reference), their inputs with locality, and the shapes' latent layouts."""

import time

import pytest
import torch

from sagevideo import bench
from sagevideo.testing import locality_qkv


def test_every_shape_has_a_latent_layout_that_adds_up():
    assert set(bench.VIDEO_LAYOUT) == set(bench.SHAPES)
    for name, (b, h, s, d) in bench.SHAPES.items():
        (t, hh, ww), text, _ = bench.VIDEO_LAYOUT[name]
        assert t * hh * ww + text == s, name


def test_locality_inputs_score_neighbours_higher_and_can_put_text_first():
    grid, text = (4, 10, 12), 6
    q, k, v = locality_qkv(1, 2, grid, text, 32, dtype=torch.float32, seed=3)
    n = grid[0] * grid[1] * grid[2]
    kc = k - k[:, :, :n].mean(dim=2, keepdim=True)  # the per-channel offset scores every key alike
    scores = torch.einsum("bhd,bhsd->bhs", q[:, :, 0], kc[:, :, :n])  # token (0, 0, 0) against every video key
    near = scores[..., [1, grid[2], grid[1] * grid[2]]].mean()  # the next column, row and frame
    far = scores[..., [n - 1, n - 2, n - grid[2] - 1]].mean()  # the far corner of the last frame
    assert near > far + 0.5 * scores.std()
    first = locality_qkv(1, 2, grid, text, 32, dtype=torch.float32, seed=3, text_first=True)
    for a, b in zip((q, k, v), first):  # the same tokens, text moved to the front
        assert torch.equal(torch.cat([a[:, :, n:], a[:, :, :n]], dim=2), b)


def _wall_ms(fn):
    t = time.perf_counter()
    for _ in range(2):
        fn()
    return (time.perf_counter() - t) * 500.0


@pytest.mark.parametrize("text_first", [False, True])
def test_sparse_rows_time_the_whole_call_and_measure_it_against_dense(text_first, monkeypatch):
    # the torch references of the kernels (same arithmetic), not the Triton interpreter: these are whole calls
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    grid, text = (4, 8, 8), 8
    shape = (1, 2, 4 * 8 * 8 + text, 32)
    rows = bench.sparse_rows("tiny", shape, list(bench.SPARSE_MODES), _wall_ms, layout=(grid, text, text_first),
                             device="cpu", sample_rows=64, log=lambda *_: None)
    assert [r.provider for r in rows] == ["sagevideo sparse-spatiotemporal", "sagevideo sparse-semantic"]
    for r in rows:
        density = float(r.note.split("density ")[1].split(",")[0])
        assert 0.0 < density <= 1.0 and r.ms > 0
        # the pattern and the quantization together stay close to dense float32 on inputs with locality
        assert r.cos > 0.95 and r.rel_l1 < 0.15, r
    assert any(float(r.note.split("density ")[1].split(",")[0]) < 0.9 for r in rows)  # something was skipped


def test_sparse_rows_reject_a_layout_that_does_not_fill_the_sequence():
    with pytest.raises(ValueError, match="sequence length"):
        bench.sparse_rows("tiny", (1, 2, 300, 32), ["sparse-semantic"], _wall_ms, layout=((4, 8, 8), 8, False),
                          device="cpu")


@pytest.mark.parametrize("text_first", [False, True])
def test_sparse_rows_tell_the_op_where_the_text_tokens_are(text_first, monkeypatch):
    """The op is told the grid and the text span that the inputs were built with (text before the video for
    CogVideoX, after it for HunyuanVideo)."""
    import sagevideo

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    grid, text = (2, 4, 6), 5
    shape = (1, 2, 2 * 4 * 6 + text, 16)
    seen = []
    real = sagevideo.sparse_attention

    def spy(q, k, v, **kw):
        seen.append((q, kw["grid"], kw["text"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(sagevideo, "sparse_attention", spy)
    bench.sparse_rows("tiny", shape, ["sparse-semantic"], _wall_ms, layout=(grid, text, text_first), device="cpu",
                      sample_rows=16, seed=4, log=lambda *_: None)
    built = locality_qkv(1, 2, grid, text, 16, dtype=torch.bfloat16, seed=4, text_first=text_first)
    q, g, span = seen[0]
    assert torch.equal(q, built[0]) and g == grid
    assert span == ((0, text) if text_first else (shape[2] - text, text))

"""Transformer benchmark (GPU): one denoising forward of full-size video DiTs, dense SDPA vs sagevideo's modes.

    python benchmarks/pipeline.py --out results.json
    python benchmarks/pipeline.py --models wan2.1-1.3b cogvideox-5b --modes sdpa int8-fp8

Each model is built from its published transformer config with random weights, directly on the GPU in bf16
(nothing is downloaded), and fed random inputs of the real shapes (latents, text embeddings of the real
length, a mid-trajectory timestep). For every mode, in the same process:

* ``sdpa`` — the unpatched model (diffusers' native backend: PyTorch SDPA, flash/cuDNN);
* ``patched-dense`` — patched by sagevideo with the ``dense`` method (the cost of the patch machinery and guard);
* ``int8-fp16`` / ``int8-fp8`` — patched with that method for every DiT self-attention call;
* ``sparse-spatiotemporal`` / ``sparse-semantic`` — every layer sparse with the method's defaults (``auto``
  precision), i.e. one forward of a step after the warm-up; profiling / k-means and permutation are inside the
  timed forward (cold on an untimed whole warm-up forward, warm-started after). ``sparse-spatiotemporal-forced``
  raises the profiling tolerance so that every head takes its best pattern (random weights attend nearly
  uniformly, so the real profile keeps them dense): the speed of a sparse step, not its accuracy. Each sparse
  row reports the mean density the methods ran at and the head classes. The big models' default lists leave them
  out: ask for them with ``--modes``.

Timing: CUDA events around one transformer forward under ``torch.inference_mode``. The warm-up is a forward with
every block list cut to its first block (each attention call site runs at its real shape, so SDPA backend selection
and Triton autotuning happen there, at a fraction of a full forward's cost); then the median of up to ``--reps``
forwards (sparse modes: the mean of a multiple of 3, since a plan is rebuilt every third call; the patched model
sees no scheduler, so each forward is told its step with ``handle.set_step``), fewer when a forward is slow (``--budget-s`` caps the whole run; models that no longer fit in
it are skipped and say so). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed forwards (weights
included) and the same minus what was allocated before them (activations). Accuracy: relative L1 and cosine of the
transformer output against the ``sdpa`` output of the same inputs. A model whose weights do not fit in free GPU
memory is skipped with the reason.

Published configs (``transformer/config.json`` of the diffusers repositories):
Wan2.1-T2V-1.3B (12 heads × 128, 30 layers, FFN 8960), Wan2.1-T2V-14B (40 × 128, 40 layers, FFN 13824),
HunyuanVideo (24 × 128, 20 dual-stream + 40 single-stream blocks), CogVideoX-5B (48 × 64, 42 layers, RoPE).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

from sagevideo.sparse.api import DEFAULT_REPLAN_EVERY

# name -> (family, transformer class, config kwargs, input builder name, description)
MODELS = {
    "wan2.1-1.3b": dict(
        cls="WanTransformer3DModel",
        config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        inputs="wan", video=(81, 480, 832), what="Wan2.1-T2V-1.3B, 480×832, 81 frames",
    ),
    "cogvideox-5b": dict(
        cls="CogVideoXTransformer3DModel",
        config=dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
                    time_embed_dim=512, text_embed_dim=4096, num_layers=42, sample_width=90, sample_height=60,
                    sample_frames=49, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=226,
                    use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False),
        inputs="cogvideox", video=(49, 480, 720), what="CogVideoX-5B, 480×720, 49 frames",
    ),
    "wan2.1-14b": dict(
        cls="WanTransformer3DModel",
        config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                    out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
        inputs="wan", video=(81, 720, 1280), what="Wan2.1-T2V-14B, 720×1280, 81 frames",
        default_modes=("sdpa", "int8-fp16", "int8-fp8"),  # ~10 s per forward: skip patched-dense by default
    ),
    "hunyuanvideo": dict(
        cls="HunyuanVideoTransformer3DModel",
        config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                    rope_theta=256.0, rope_axes_dim=(16, 56, 56)),
        inputs="hunyuan_video", video=(129, 720, 1280), what="HunyuanVideo, 720×1280, 129 frames",
        default_modes=("sdpa", "int8-fp16", "int8-fp8"),  # ~30-50 s per forward
    ),
}
# the sparse modes run every layer sparse (a "sparse step": the warm-up steps and layer are not in one forward),
# int8-fp8, planning (profiling / k-means + permutation) included in the timed forward
MODES = ("sdpa", "patched-dense", "int8-fp16", "int8-fp8", "sparse-spatiotemporal", "sparse-semantic",
         "sparse-spatiotemporal-forced")
# Random weights give near-uniform attention, where profiling rightly keeps every head dense. The "-forced" mode
# sets the profiling tolerance so high that every head takes its best pattern: the speed of a sparse step when
# the patterns fit (as on trained models), not a statement about accuracy.
MODE_METHODS = {"sparse-spatiotemporal-forced": ("sparse-spatiotemporal", {"tolerance": 1e30})}
# sparse modes time a whole number of these forwards and report their mean: the plan's cost amortised
REPLAN_CYCLE = DEFAULT_REPLAN_EVERY
# each timed forward is told its step (0 = the warm-up), as a sampler's forwards are, out of this many
NOMINAL_STEPS = 1000


def _params(cfg: dict) -> int:
    """Parameter count without building the model (meta device)."""
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cfg["cls"])(**cfg["config"])
    return sum(p.numel() for p in model.parameters())


def _build(cfg: dict):
    import diffusers

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # create the weights in bf16 directly: a 14B model never exists in fp32
    try:
        with torch.device("cuda"):
            model = getattr(diffusers, cfg["cls"])(**cfg["config"])
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval()


def _inputs(cfg: dict, model) -> tuple[dict, int]:
    """Random inputs of the real shapes, and the self-attention sequence length."""
    g = torch.Generator(device="cuda").manual_seed(0)
    frames, height, width = cfg["video"]
    dev, bf16 = "cuda", torch.bfloat16

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev, dtype=torch.float32).to(bf16)

    lat_t = (frames - 1) // 4 + 1
    if cfg["inputs"] == "wan":
        lat_h, lat_w = height // 8, width // 8
        seq = lat_t * (lat_h // 2) * (lat_w // 2)
        return dict(hidden_states=randn(1, 16, lat_t, lat_h, lat_w), timestep=torch.tensor([500.0], device=dev),
                    encoder_hidden_states=randn(1, 512, 4096), return_dict=False), seq
    if cfg["inputs"] == "hunyuan_video":
        lat_h, lat_w = height // 8, width // 8
        text = 256
        mask = torch.zeros(1, text, dtype=torch.bool, device=dev)
        mask[:, :80] = True  # a prompt of 80 tokens, the rest padding (the key-padding mask is exercised)
        seq = lat_t * (lat_h // 2) * (lat_w // 2) + text
        return dict(hidden_states=randn(1, 16, lat_t, lat_h, lat_w), timestep=torch.tensor([500.0], device=dev),
                    encoder_hidden_states=randn(1, text, 4096), encoder_attention_mask=mask,
                    pooled_projections=randn(1, 768), guidance=torch.tensor([6000.0], device=dev),
                    return_dict=False), seq
    # CogVideoX: (B, F, C, H, W), 226 text tokens first, RoPE over the 30 × 45 grid as the pipeline computes it
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    c = model.config
    lat_h, lat_w = height // 8, width // 8
    grid_h, grid_w = lat_h // c.patch_size, lat_w // c.patch_size
    crops = get_resize_crop_region_for_grid((grid_h, grid_w), c.sample_width // c.patch_size, c.sample_height // c.patch_size)
    rope = get_3d_rotary_pos_embed(embed_dim=c.attention_head_dim, crops_coords=crops, grid_size=(grid_h, grid_w),
                                   temporal_size=lat_t, device=dev)
    seq = lat_t * grid_h * grid_w + c.max_text_seq_length
    return dict(hidden_states=randn(1, lat_t, 16, lat_h, lat_w), encoder_hidden_states=randn(1, c.max_text_seq_length, 4096),
                timestep=torch.tensor([500], device=dev), image_rotary_emb=rope, return_dict=False), seq


class _FirstBlocksOnly:
    """Within the block, every block list of the transformer holds only its first block.

    The warm-up runs that short forward: every attention call site sees its real shape, layout and mask (so
    cuDNN/flash selection and Triton autotuning happen there) at a small fraction of a full forward's cost.
    """

    ATTRS = ("blocks", "transformer_blocks", "single_transformer_blocks")

    def __init__(self, model):
        self.model = model
        self.saved = {}

    def __enter__(self):
        for attr in self.ATTRS:
            blocks = getattr(self.model, attr, None)
            if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 1:
                self.saved[attr] = blocks
                setattr(self.model, attr, blocks[:1])

    def __exit__(self, *exc):
        for attr, blocks in self.saved.items():
            setattr(self.model, attr, blocks)


def _time_forward(model, inputs, reps: int, budget_s: float, full_warmup: bool = False, cycle: int = 1,
                  set_step=None):
    """(times in ms, peak bytes, activation bytes, output): a one-block warm-up (``full_warmup``: a whole
    untimed forward, for the sparse methods, whose first call per layer plans cold), then 1 to ``reps`` timed
    forwards (as many as fit in ``budget_s`` after the first), a multiple of ``cycle`` of them when ``cycle`` > 1
    (at least one cycle, whatever the budget). ``set_step(i)``, when given, is called before forward ``i`` (the
    warm-up is 0): each forward is then a denoising step of its own, as in a sampler."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    with torch.inference_mode():
        if set_step is not None:
            set_step(0)
        if full_warmup:
            model(**inputs)
        else:
            with _FirstBlocksOnly(model):
                model(**inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = None
        n = reps
        while len(times) < n:
            out = None
            if set_step is not None:
                set_step(len(times) + 1)
            start.record()
            out = model(**inputs)[0]
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            if len(times) == 1:
                n = max(1, min(reps, int(budget_s * 1000 / times[0])))
                n = max(cycle, n // cycle * cycle)
        peak = torch.cuda.max_memory_allocated()
    return times, peak, peak - base, out


def _accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    o, r = out.double().flatten(), ref.double().flatten()
    if not torch.isfinite(o).all():
        return {"rel_l1": math.inf, "cos": math.nan}
    return {
        "rel_l1": float((o - r).abs().sum() / r.abs().sum()),
        "cos": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
    }


def bench_model(name: str, modes, reps: int, budget_s: float, log=print) -> dict:
    from sagevideo.config import AttentionConfig
    from sagevideo.patching import patch_transformer

    cfg = MODELS[name]
    row = {"model": name, "what": cfg["what"], "modes": {}}
    params = _params(cfg)
    row["params_b"] = round(params / 1e9, 2)
    free, _ = torch.cuda.mem_get_info()
    need = params * 2 * 1.25  # bf16 weights plus a margin for activations
    if need > free:
        row["skipped"] = f"needs ~{need / 2**30:.0f} GiB for weights, {free / 2**30:.0f} GiB free"
        log(f"{name}: skipped ({row['skipped']})")
        return row
    t_build = time.perf_counter()
    try:
        model = _build(cfg)
        inputs, seq = _inputs(cfg, model)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        row["skipped"] = "out of memory while building the model"
        log(f"{name}: skipped ({row['skipped']})")
        return row
    row.update(seq_len=seq, build_s=round(time.perf_counter() - t_build, 1))
    per_mode = budget_s / max(1, len(modes))
    ref = None
    try:
        for mode in modes:
            handle = None
            if mode != "sdpa":
                method, params = MODE_METHODS.get(mode, ("dense" if mode == "patched-dense" else mode, {}))
                handle = patch_transformer(model, AttentionConfig.uniform(method, **params))
            try:
                # sparse: the mean of whole re-planning cycles (a plan is rebuilt every 3rd call,
                # sagevideo.sparse.api.DEFAULT_REPLAN_EVERY); median otherwise
                times, peak, act, out = _time_forward(model, inputs, reps, per_mode,
                                                      full_warmup=mode.startswith("sparse"),
                                                      cycle=REPLAN_CYCLE if mode.startswith("sparse") else 1,
                                                      set_step=None if handle is None else
                                                      lambda i, h=handle: h.set_step(i, NOMINAL_STEPS))
            except torch.cuda.OutOfMemoryError:
                row["modes"][mode] = {"skipped": "out of memory"}
                log(f"{name} {mode}: out of memory")
                torch.cuda.empty_cache()
                continue
            finally:
                if handle is not None:
                    guard = len(handle.guard_events)
                    sparse = next(iter(handle.sparse_report().values()), None)
                    handle.unpatch()
            stat = "mean" if mode.startswith("sparse") else "median"
            ms = statistics.mean(times) if stat == "mean" else statistics.median(times)
            entry = {"ms": round(ms, 2), "stat": stat, "all_ms": [round(t, 2) for t in times],
                     "peak_gib": round(peak / 2**30, 3), "activation_gib": round(act / 2**30, 3)}
            if handle is not None:
                entry["guard_events"] = guard
                if sparse:
                    entry["sparse_density"] = round(sparse["mean_density"], 4)
                    entry["sparse_heads"] = sparse["heads"]
            if mode == "sdpa":
                ref = out.float().cpu()  # off the GPU, so later modes' peaks are comparable
            elif ref is not None:
                entry.update(_accuracy(out.cpu(), ref))
            del out
            row["modes"][mode] = entry
            log(f"{name} {mode}: {entry['ms']:.1f} ms ({stat} of {len(times)}), peak {entry['peak_gib']:.2f} GiB"
                + (f", rel_l1 {entry['rel_l1']:.4f}" if "rel_l1" in entry else "")
                + (f", density {entry['sparse_density']:.3f} heads {entry['sparse_heads']}" if "sparse_density" in entry
                   else ""))
        base = row["modes"].get("sdpa", {}).get("ms")
        for entry in row["modes"].values():
            if base and "ms" in entry:
                entry["speedup_vs_sdpa"] = round(base / entry["ms"], 3)
    finally:
        del model, inputs, ref
        torch.cuda.empty_cache()
    return row


def environment() -> dict:
    import diffusers

    import sagevideo

    try:
        from sagevideo.bench import environment as kernel_environment

        env = kernel_environment()
    except ImportError:
        props = torch.cuda.get_device_properties(0)
        env = {"gpu": props.name, "sm": f"{props.major}{props.minor}", "torch": torch.__version__}
    env.update(diffusers=diffusers.__version__, sagevideo=sagevideo.__version__, date=time.strftime("%Y-%m-%d"))
    return env


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<14} {'tokens':>7} {'mode':<14} {'ms':>9} {'× sdpa':>7} {'peak GiB':>9} {'act GiB':>8} {'rel L1':>8}"]
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['model']:<14} skipped: {row['skipped']}")
            continue
        for mode, e in row["modes"].items():
            if "skipped" in e:
                lines.append(f"{row['model']:<14} {row['seq_len']:>7} {mode:<14} skipped: {e['skipped']}")
                continue
            rel = f"{e['rel_l1']:.4f}" if "rel_l1" in e else "—"
            lines.append(f"{row['model']:<14} {row['seq_len']:>7} {mode:<14} {e['ms']:>9.1f} "
                         f"{e.get('speedup_vs_sdpa', 0):>7.2f} {e['peak_gib']:>9.2f} {e['activation_gib']:>8.2f} {rel:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", choices=list(MODELS), default=list(MODELS), help="models, in order")
    ap.add_argument("--modes", nargs="*", choices=MODES,
                    help=f"modes (default: all of {', '.join(MODES)}; the two largest models skip patched-dense)")
    ap.add_argument("--reps", type=int, default=5, help="timed forwards per mode at most (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=220.0, help="wall-clock budget of the whole run, seconds")
    ap.add_argument("--out", help="write environment and results as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA GPU; this benchmark times full-size transformers on a GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    rows = []
    for i, name in enumerate(args.models):
        left = args.budget_s - (time.perf_counter() - t0)
        # share what is left among the remaining models, larger ones later in the default order
        share = left / (len(args.models) - i)
        if left < 15:
            rows.append({"model": name, "skipped": f"time budget of {args.budget_s:.0f} s used up", "modes": {}})
            print(f"{name}: skipped (time budget used up)")
            continue
        modes = args.modes or MODELS[name].get("default_modes", MODES)
        rows.append(bench_model(name, sorted(set(modes), key=MODES.index), args.reps, share * 0.8))
    result = {"environment": environment(), "wall_s": round(time.perf_counter() - t0, 1), "results": rows}
    print(format_table(rows))
    print(f"total {result['wall_s']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

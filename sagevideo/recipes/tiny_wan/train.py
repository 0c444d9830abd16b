"""Train the tiny Wan text-to-video model from scratch, within a wall-clock budget, resumably.

::

    python -m sagevideo.recipes.tiny_wan.train --out OUT --seed 0 \\
        --vae-minutes 5.0 --dit-minutes 5 --total-minutes 9.3 --device cuda

Stages (each stops itself when its budget is spent, and ends with a learning-rate cool-down):

1. **VAE** - ``AutoencoderKLWan`` on crops of generated clips rendered at 256 and at 128 (objects at both
   generation scales), cycling through 9-frame 128x128 crops and 33-frame 96x96 ones (the default generation
   length: the causal VAE's later frames drift in colour when it never saw clips that long), with fewer photo
   backgrounds than the transformer sees;
   L1 + L2 weighted up on the objects' own pixels (the renderer's coverage mask), + image-gradient L1 + a
   small KL, through whole-clip passes that equal the pipeline's causal chunked encode/decode
   (:mod:`.vae`: the same modules, a third faster to train), so what is trained is what the pipeline runs.
   Afterwards: per-channel latent mean/std (written into the VAE config, as the pipeline expects),
   reconstruction PSNR on held-out clips at the default size, and the evaluation's colour / direction checks
   on correct answers to the held-out prompts passed through the VAE (:func:`evaluate.heldout_reference`: the
   best any transformer could score with this VAE).
1b. **Decoder fine-tune** (``--vae-decoder-minutes``) - the decoder alone on whole 33-frame clips at the
   generation sizes, decoding the posterior mode; the encoder, hence the latent space and a transformer
   trained on it, does not change.
2. **Text encoder + transformer** jointly, rectified-flow velocity loss weighted up on the latent cells an
   object covers, 10% caption dropout (so classifier-free guidance has an unconditional branch, the empty
   prompt the pipeline uses by default). Batches alternate between 64 clips of 33x256x256 (the default
   size) and 128 of 17x128x128 (the size the CPU tests use), half each; the text encoder and the
   transformer blocks run under ``torch.compile`` (``--compile``), the blocks' self-attention written in a
   form that compiles to faster kernels and computes the same values (:class:`model.training_attention`).
   Each batch of VAE latents serves 1-8 steps with fresh noise (picked after calibration from the measured
   cost of render + encode against a transformer step, or fixed with ``--latent-reuse``), because encoding
   a batch costs several transformer steps; the next batch is rendered and encoded in a worker thread on its
   own CUDA stream while the current one trains (``--prefetch``, :class:`Prefetcher`). The conditioning is
   the pipeline's (text states zero-padded to 512 positions) computed in an exactly equivalent compact form
   (:func:`model.encode_prompts_compact` + :class:`model.training_attention`, checked against the
   512-position form by ``tests/test_tiny_wan_recipe.py``), so short clips do not pay for 500 padding
   positions.

Finally the held-out prompts are generated and checked (colour, direction; :mod:`.evaluate`).

Budgets. ``--vae-minutes``/``--dit-minutes`` are this call's budgets for each stage; ``--total-minutes``
caps the whole call counted from the process start (imports included): the transformer stage then ends
early enough to leave time for the evaluation and the last save. After a few calibration steps each stage
plans its step count from its measured speed so that its cool-down ends inside the budget, re-plans until
the cool-down starts, and counts as finished if the budget runs out anyway (``stopped_by_budget``), so one
call always yields a complete model. ``--vae-steps``/``--dit-steps``/``--latent-reuse`` fix the plan
instead. ``--more-dit-minutes M`` (or ``--more-dit-steps N``) with ``--resume`` of a finished run trains
the text encoder + transformer further: a learning-rate re-warmup, then a new cool-down. ``--more-vae-decoder-minutes M``
likewise extends a finished decoder fine-tune (the encoder, hence the latent space, stays fixed).

Determinism. Given the seed and the plan (step counts and latent-reuse choices, recorded in
``state.json``), the data stream (scene descriptions and captions, crops, caption dropout, bucket choice,
noise and noise levels - all derived from ``(seed, stream, step)``), the initialisation and the tokenizer
are deterministic; on the CPU two runs are identical bit for bit, and so is a run paused with
``--stop-after-steps`` and resumed, when the checkpoints are exact (``--checkpoint-dtype float32``; both
checked by ``tests/test_tiny_wan_recipe.py``). The default checkpoints round weights to fp16 and AdamW
moments to bf16, so a resumed run differs from an uninterrupted one by that rounding. On the GPU the
floating-point reductions of cuDNN and the attention kernels are not bitwise reproducible.

Output folder (``--out``; 8 files, each < 16 MB with the default ``--checkpoint-dtype half``, so it fits
the return limits of a GPU job, which returns at most 8 files: write nothing else into ``$OUT`` in the same
job, or files are dropped — the first H100 run, 2026-11-23, lost both weight files that way):

* ``transformer.safetensors``      transformer weights, fp16 (9.8 MB)
* ``vae_text_encoder.safetensors`` VAE (``vae.``) and text encoder (``text_encoder.``) weights, fp16 (8.0 MB)
* ``optim_m.safetensors``, ``optim_v.safetensors``  AdamW moments of the stage in progress, bf16 (12.6 MB each)
* ``tokenizer.json``               the trained tokenizer
* ``state.json``                   progress, step counts, schedules, metrics; for every call its argv,
  environment, time from the process start, step counters and held-out evaluation (the model card's recipe
  is written from these)
* ``train_log.txt``                the progress log; ``loss_curve.tsv`` the loss curve

Resume with ``--resume DIR`` (a previous ``--out``; may equal ``--out``): weights, moments, step counters
and the tokenizer are restored and an unfinished stage continues its schedule with this call's budget.
The two ``optim_*`` files may be left out (a finished run needs none; an unfinished stage then continues
with fresh moments and a learning-rate re-warmup). ``python -m sagevideo.recipes.tiny_wan.assemble`` turns
a finished folder into ``assets/tiny-wan``.

Three GPU jobs of at most 10 minutes each
-----------------------------------------

The recipe for ``assets/tiny-wan`` (2026-11-24: 27 minutes of one H100 in all, package installs included; 24 of
them in the training stages). The GPU machine needs, besides torch, transformers, tokenizers, safetensors and
huggingface_hub: ``diffusers==0.42.1`` (and its ``importlib_metadata``) and ``scikit-image==0.26.0`` (its
sample photographs; it needs scipy, networkx, pillow, imageio, tifffile, packaging, ``lazy-loader``).
Without a network there, carry the wheels in a folder ``.whl/`` and install them first. Where what a job may
carry is capped (this project's GPU tool: 64 MiB, the 45 MiB tracked tree included, 2026-11-24), carry only
what the machine lacks: that tool's image has scikit-image 0.26.0, so diffusers and importlib_metadata
(6 MiB) were enough on 2026-11-24 (the shipped model's jobs carried scikit-image too, repacked without the
sample files the recipe does not read: 15 MiB). A resumed job's ``.tw1`` without its ``optim_*`` files is
about 17 MiB; where it does not fit, the previous job assembled into the working tree's ``assets/tiny-wan``
(in place of the shipped files, uncommitted) does, and ``assemble --unpack --from assets/tiny-wan --to
.tw1`` rebuilds ``.tw1`` from it on the GPU machine (the shipped model's jobs 2 and 3 did this). ``$OUT``
is the folder whose files the job returns. Every job starts with::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

Job 1: the VAE (3.2 min, about 1,000 steps), its decoder alone on whole frames (1.1 min; the 128-pixel crops
of stage 1 leave the 256x256 decode with colour casts), then text encoder + transformer until shortly before
the cap (a complete model, not evaluated)::

    python3 -m sagevideo.recipes.tiny_wan.train --out $OUT --seed 0 --device cuda --vae-minutes 3.2 \\
        --vae-decoder-minutes 1.1 --dit-minutes 9 --latent-reuse 16 --total-minutes 9.25 --no-eval

Jobs 2 and 3: about 7.5 more minutes of text encoder + transformer each (learning-rate re-warmup, then a new
cool-down), the training noise levels shifted up to the sampler's shift from job 2 on (``--dit-shift 3``)::

    python3 -m sagevideo.recipes.tiny_wan.train --resume .tw1 --out $OUT --seed 0 --device cuda \\
        --more-dit-minutes 9 --latent-reuse 32 --dit-shift 3 --total-minutes 9.1   # job 2
    python3 -m sagevideo.recipes.tiny_wan.train --resume .tw1 --out $OUT --seed 0 --device cuda \\
        --more-dit-minutes 9 --latent-reuse 16 --total-minutes 9.1                 # job 3

Colour words are followed early; direction words last: after job 2 (8,529 transformer steps, 18 minutes) the
object moved the stated way for 6/8 held-out prompts at 17x128x128, and the CPU tests of direction and shape
words failed; after job 3 (14,302 steps) 8/8, and every test passes. The previous recipe (2026-11-23: five jobs,
38 minutes of training) ran the VAE through ``AutoencoderKLWan``'s chunked passes, 7 minutes for its VAE stages;
with the whole-clip passes (:mod:`.vae`) they took 4.3 minutes, and fewer steps (987 + 213 against 1,238 + 301)
gave a VAE at least as good (20.96 against 20.22 dB held-out PSNR; the GPU's VAE stage is not bitwise
reproducible, and the same budget has given results 2 dB apart).

Then, on any machine: ``python -m sagevideo.recipes.tiny_wan.assemble --from RUN3 --to assets/tiny-wan``
(RUN3: job 3's files). Any finished job's files assemble into a complete, shorter-trained model. To train
the shipped model further, ``python -m sagevideo.recipes.tiny_wan.assemble --unpack --from assets/tiny-wan
--to .tw1`` rebuilds its training folder (the same fp16 weights, state and tokenizer; ``assets/tiny-wan/training``
keeps the record), and a job like job 3 resumes from it.
``python -m sagevideo.recipes.tiny_wan.speed_probe`` times the training steps against batch size and
``torch.compile`` on the GPU at hand (the preset's batch sizes come from it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from sagevideo.recipes.tiny_wan import data as D
from sagevideo.recipes.tiny_wan import evaluate as E
from sagevideo.recipes.tiny_wan import model as M
from sagevideo.recipes.tiny_wan import vae as V

# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict] = {
    # the real recipe (H100): ~1.5-2k VAE steps, ~2.5-4k transformer steps in ~8 minutes
    "full": dict(
        # VAE clips, cycled by step: 9-frame 128 crops (spatial extent) and 33-frame 96 crops (the default
        # generation length: the causal encoder's later latent frames drift when trained on 9 frames only)
        vae_buckets=[dict(render=256, crop=128, frames=9, batch=32), dict(render=128, crop=128, frames=9, batch=32),
                     dict(render=256, crop=96, frames=33, batch=16), dict(render=128, crop=96, frames=33, batch=16)],
        vae_lr=8e-4, vae_warmup=100, vae_backgrounds=(0.5, 0.3, 0.2), vae_object_weight=8.0,
        dit_buckets=[dict(frames=33, height=256, width=256, batch=64, weight=0.5),
                     dict(frames=17, height=128, width=128, batch=128, weight=0.5)],
        dit_lr=5e-4, dit_warmup=200, latent_reuse=2, caption_dropout=0.1, dit_object_weight=4.0,
        text_slots=64, compile=True, eval_guidances=[2.0, 3.5],
        vae_dec_buckets=[dict(frames=33, height=256, width=256, batch=4),
                         dict(frames=33, height=128, width=128, batch=16)],
        vae_dec_lr=3e-4, vae_dec_warmup=50, calib_vae_dec=(10, 40),
        calib_vae=(10, 40), calib_dit=(60, 110),  # the dit window starts after both buckets are compiled
        stats_clips=64, psnr_clips=32, psnr_size=(33, 256, 256), eval_batch=8,
        eval_sizes=[(17, 128, 128), (33, 256, 256)], eval_steps=20, eval_guidance=5.0, eval_prompts=8,
        photo_size=512, ckpt_every_s=60.0, log_every=25, curve_every=10,
    ),
    # learnability check on a CPU in ~25 minutes: same models, 9x64x64 clips (48 video tokens)
    "cpu-check": dict(
        vae_buckets=[dict(render=128, crop=64, frames=9, batch=4), dict(render=64, crop=64, frames=9, batch=4)],
        vae_lr=6e-4, vae_warmup=20, vae_backgrounds=(0.5, 0.3, 0.2), vae_object_weight=8.0,
        dit_buckets=[dict(frames=9, height=64, width=64, batch=16, weight=1.0)],
        dit_lr=5e-4, dit_warmup=50, latent_reuse=2, caption_dropout=0.1, dit_object_weight=4.0,
        text_slots=64, compile=False, eval_guidances=[],
        vae_dec_buckets=[dict(frames=9, height=64, width=64, batch=4)],
        vae_dec_lr=3e-4, vae_dec_warmup=20, calib_vae_dec=(5, 25),
        calib_vae=(5, 25), calib_dit=(5, 45),
        stats_clips=32, psnr_clips=16, psnr_size=(9, 64, 64), eval_batch=8,
        eval_sizes=[(9, 64, 64)], eval_steps=20, eval_guidance=5.0, eval_prompts=8,
        photo_size=256, ckpt_every_s=120.0, log_every=50, curve_every=5,
    ),
    # CPU smoke test of the whole flow in seconds (same models, tiny clips: 5x32x32 and 9x32x48; with
    # --vae-steps/--dit-steps for a fixed length). Used by tests/test_tiny_wan_recipe.py.
    "smoke": dict(
        vae_buckets=[dict(render=48, crop=32, frames=5, batch=2), dict(render=32, crop=32, frames=5, batch=2),
                     dict(render=48, crop=32, frames=9, batch=1)],
        vae_lr=6e-4, vae_warmup=2, vae_backgrounds=(0.5, 0.3, 0.2), vae_object_weight=8.0,
        dit_buckets=[dict(frames=5, height=32, width=32, batch=2, weight=0.5),
                     dict(frames=9, height=32, width=48, batch=2, weight=0.5)],
        dit_lr=5e-4, dit_warmup=2, latent_reuse=2, caption_dropout=0.1, dit_object_weight=4.0,
        text_slots=64, compile=False, eval_guidances=[1.0],
        vae_dec_buckets=[dict(frames=5, height=32, width=32, batch=2), dict(frames=5, height=48, width=48, batch=1)],
        vae_dec_lr=3e-4, vae_dec_warmup=2, calib_vae_dec=(2, 4),
        calib_vae=(2, 4), calib_dit=(2, 4),
        stats_clips=2, psnr_clips=2, psnr_size=(5, 32, 32), eval_batch=2,
        eval_sizes=[(5, 32, 32)], eval_steps=2, eval_guidance=5.0, eval_prompts=2,
        photo_size=64, ckpt_every_s=30.0, log_every=2, curve_every=1,
    ),
}

def process_start_time() -> float:
    """Wall-clock time this process started (Linux ``/proc``), so ``--total-minutes`` also covers the
    interpreter start and the imports; falls back to now."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except Exception:  # noqa: BLE001
        return time.time()


MAX_LATENT_REUSE = 8
COOLDOWN_FRACTION = 0.2  # final share of each stage's steps over which the LR decays linearly
FINAL_LR_FACTOR = 0.02
BUDGET_SAFETY = 0.93  # planned steps = safety * remaining time / measured step time
FINAL_RESERVE_S = {"full": 50.0, "cpu-check": 60.0, "smoke": 5.0}  # time kept after the transformer stage for eval + save
RETURN_LIMIT_BYTES = 16_000_000  # each output file must stay under this (the GPU job's file-return limit)

FILES = ("transformer.safetensors", "vae_text_encoder.safetensors", "optim_m.safetensors",
         "optim_v.safetensors", "tokenizer.json", "state.json", "train_log.txt", "loss_curve.tsv")


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


class Prefetcher:
    """Produces data batch ``d + 1`` in a worker thread while the caller trains on batch ``d``.

    ``produce(d)`` returns a tuple whose tensors are the batch. On CUDA the worker runs on its own stream, so
    the renderer's host-to-device copies (each one synchronises its stream) and the VAE encode queue beside the
    transformer's kernels instead of draining them; the caller's stream waits on an event recorded after the
    batch and the tensors are marked as used there (``record_stream``) so the allocator does not hand their
    memory to the worker early. The values are the ones ``produce(d)`` computes inline: the data stream is a
    function of ``(seed, stream, step)`` only. Disabled, ``get`` simply calls ``produce``.

    ``batches`` counts the batches handed out, ``stall_s`` the caller's time spent waiting for them,
    ``produce_s`` the time producing them (the worker's stream synchronised, so the GPU work is included).
    """

    def __init__(self, produce, device: torch.device, enabled: bool):
        self.produce, self.device, self.enabled = produce, device, enabled
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if enabled else None
        self.stream = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.pending = None  # (index, future) of the batch being produced ahead
        self.stall_s = self.produce_s = 0.0
        self.batches = 0

    def _work(self, index: int):
        t = time.time()
        if self.stream is None:
            out = self.produce(index)
            return out, None, time.time() - t
        with torch.cuda.stream(self.stream):
            out = self.produce(index)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.stream.synchronize()
        return out, event, time.time() - t

    def get(self, index: int):
        self.batches += 1
        if not self.enabled:
            t = time.time()
            out = self.produce(index)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.stall_s += time.time() - t
            self.produce_s += time.time() - t
            return out
        if self.pending is not None and self.pending[0] == index:
            future = self.pending[1]
        else:  # first call, or a jump in the data index: what was produced ahead is not used
            self._drain()
            future = self.pool.submit(self._work, index)
        t = time.time()
        out, event, seconds = future.result()
        self.stall_s += time.time() - t
        self.produce_s += seconds
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for x in out:
                if isinstance(x, torch.Tensor):
                    x.record_stream(current)
        self.pending = (index + 1, self.pool.submit(self._work, index + 1))
        return out

    def _drain(self) -> None:
        if self.pending is not None:
            # let the worker finish before anything else uses the VAE; the batch is not used, so neither is an
            # error it raised (which must not mask the error the training loop may be unwinding with)
            self.pending[1].exception()
            self.pending = None

    def close(self) -> None:
        self._drain()
        if self.pool is not None:
            self.pool.shutdown()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The VAE stages' loss: L1 + L2 weighted per pixel by ``weight`` (normalised by its mean), plus 0.5 x the
    L1 of the error's image gradients."""
    err = rec.float() - x
    norm = weight.mean()
    l1 = (err.abs() * weight).mean() / norm
    l2 = (err.pow(2) * weight).mean() / norm
    grad = (err[..., 1:, :] - err[..., :-1, :]).abs().mean() + (err[..., :, 1:] - err[..., :, :-1]).abs().mean()
    return l1 + l2 + 0.5 * grad


def latent_grid_mask(cover: torch.Tensor, latent_thw: tuple[int, int, int]) -> torch.Tensor:
    """Object coverage ``[B, 1, T, H, W]`` pooled (max) onto the VAE's latent grid ``[B, 1, T', H', W']``: latent
    frame 0 is frame 0 and latent frame ``i > 0`` frames ``4i-3 .. 4i`` (the causal VAE's 1 + 4k grouping);
    ``H / H'`` x ``W / W'`` pixels per latent cell."""
    b, _, t, h, w = cover.shape
    lt, lh, lw = latent_thw
    if (t - 1) % max(lt - 1, 1) or (lt > 1 and (t - 1) // (lt - 1) != 4) or h % lh or w % lw:
        raise ValueError(f"coverage {tuple(cover.shape)} does not map onto a latent grid {latent_thw}")
    first = cover[:, :, :1]
    if lt > 1:
        rest = cover[:, :, 1:].reshape(b, 1, lt - 1, 4, h, w).amax(dim=3)
        cover = torch.cat([first, rest], dim=2)
    else:
        cover = first
    return F.max_pool3d(cover, kernel_size=(1, h // lh, w // lw))


class Logger:
    def __init__(self, path: Path, previous: Path | None = None):
        self.path = path
        if previous is not None and previous.exists() and previous.resolve() != path.resolve():
            shutil.copyfile(previous, path)
        self.f = open(path, "a", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


def lr_at(step: int, st: dict, peak: float, warmup: int) -> float:
    """Warmup-stable-decay: linear warmup, constant, then a linear cool-down from ``st["cooldown_start"]``
    to ``st["total_steps"]``. Before the cool-down the LR does not depend on the schedule length, so
    fixing the length late (from measured speed) changes nothing that already happened. The warmup starts
    at ``st["warmup_from"]`` (0, or the step where a finished stage was extended or resumed without its
    optimizer moments: a re-warmup)."""
    lr = peak * min(1.0, (step - st.get("warmup_from", 0) + 1) / max(1, warmup))
    start, total = st.get("cooldown_start"), st.get("total_steps")
    if start is not None and total is not None and step >= start:
        frac = (step - start) / max(1, total - start)
        lr = peak * (1.0 - (1.0 - FINAL_LR_FACTOR) * min(1.0, frac))
    return lr


def plan_schedule(st: dict, step: int, remaining_steps: int) -> None:
    """Set total_steps / cooldown_start for ``remaining_steps`` more steps (cool-down = the last
    COOLDOWN_FRACTION of the whole stage, or everything that is left if that is less)."""
    total = step + max(1, remaining_steps)
    st["total_steps"] = total
    st["cooldown_start"] = max(step, total - max(1, int(round(COOLDOWN_FRACTION * total))))


def named_params(modules: dict[str, torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """Parameters with a module prefix; tied parameters appear once (named_parameters deduplicates)."""
    out = []
    for prefix, m in modules.items():
        out.extend((f"{prefix}.{n}", p) for n, p in m.named_parameters())
    return out


def checkpoint_tensors(tensors: dict[str, torch.Tensor], exact: bool = False) -> dict[str, torch.Tensor]:
    """Tensors as the training checkpoints store them: fp16, which halves the files (a tensor that would
    overflow fp16 stays fp32), or fp32 with ``exact``."""
    out = {}
    for k, v in tensors.items():
        if exact:
            out[k] = v.detach().float()
            continue
        h = v.detach().to(torch.float16)
        out[k] = h if torch.isfinite(h).all() else v.detach().float()
    return out


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata=dict(sorted((k, str(v)) for k, v in (metadata or {}).items())) or None)
    os.replace(tmp, path)


def load_into(modules: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    for name, p in named_params(modules):
        if name not in tensors:
            raise KeyError(f"checkpoint lacks {name}")
        with torch.no_grad():
            p.copy_(tensors[name].to(p.dtype))


def make_adamw(params: list[torch.nn.Parameter], lr: float, device: torch.device, weight_decay: float):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=device.type == "cuda")


def optimizer_moments(opt, named: list[tuple[str, torch.nn.Parameter]],
                      dtype: torch.dtype = torch.bfloat16) -> tuple[dict, dict]:
    m, v = {}, {}
    for name, p in named:
        st = opt.state.get(p)
        if st:
            m[name] = st["exp_avg"].detach().to(dtype=dtype, copy=True)
            v[name] = st["exp_avg_sq"].detach().to(dtype=dtype, copy=True)
    return m, v


def restore_moments(opt, named, m: dict, v: dict, step: int) -> int:
    fused = any(g.get("fused") for g in opt.param_groups)
    restored = 0
    for name, p in named:
        if name in m and name in v:
            step_t = (torch.tensor(float(step), dtype=torch.float32, device=p.device) if fused
                      else torch.tensor(float(step), dtype=torch.float32))
            opt.state[p] = {"step": step_t, "exp_avg": m[name].to(p.device, torch.float32, copy=True),
                            "exp_avg_sq": v[name].to(p.device, torch.float32, copy=True)}
            restored += 1
    return restored


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ----------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------


class Trainer:
    def __init__(self, args):
        self.args = args
        self.t_start = time.time()
        self.cfg = dict(PRESETS[args.preset])
        if args.latent_reuse is not None:
            self.cfg["latent_reuse"] = args.latent_reuse
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.resume = Path(args.resume) if args.resume else None
        self.log = Logger(self.out / "train_log.txt", self.resume / "train_log.txt" if self.resume else None)
        self.process_start = process_start_time()
        self.deadline_total = (self.process_start + args.total_minutes * 60.0) if args.total_minutes else None

        # state
        if self.resume is not None:
            self.state = json.loads((self.resume / "state.json").read_text())
            if self.state["seed"] != args.seed:
                raise SystemExit(f"--seed {args.seed} differs from the checkpoint's seed {self.state['seed']}")
            if self.state["preset"] != args.preset:
                raise SystemExit(f"--preset {args.preset} differs from the checkpoint's {self.state['preset']}")
            self.state.setdefault("calls", [])
        else:
            self.state = {
                "format": 1, "seed": args.seed, "preset": args.preset,
                "configs": {"vae": M.VAE_CONFIG, "transformer": M.TRANSFORMER_CONFIG,
                            "text_encoder": M.TEXT_ENCODER_CONFIG, "scheduler": M.SCHEDULER_CONFIG,
                            "preset": self.cfg},
                "vae": {"step": 0, "total_steps": None, "done": False, "seconds": 0.0},
                "dit": {"step": 0, "total_steps": None, "done": False, "seconds": 0.0},
                "optim_stage": None, "calls": [],
            }
        self.state.setdefault("vae_decoder", {"step": 0, "total_steps": None, "done": False, "seconds": 0.0})
        self.state["calls"].append({"argv": args.argv,
                                    "environment": environment(self.device),
                                    "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.curve_rows: list[str] = []
        self.steps_left = args.stop_after_steps  # optimizer steps this call may still take (None: no cap)
        self.paused = False
        prev_curve = self.resume / "loss_curve.tsv" if self.resume else None
        if prev_curve is not None and prev_curve.exists():
            self.curve_rows = prev_curve.read_text().splitlines()[1:]

        # tokenizer (rebuilt only on a fresh start: the checkpoint's is the one the text encoder knows)
        if self.resume is not None:
            self.tok_json = (self.resume / "tokenizer.json").read_text()
        else:
            self.tok_json = M.train_tokenizer().to_str()
        self.tokenizer = M.wrap_tokenizer(M.tokenizer_from_json(self.tok_json))
        (self.out / "tokenizer.json").write_text(self.tok_json)

        # models (deterministic init per model, independent of build order)
        torch.manual_seed(args.seed * 1000 + 1)
        self.vae = M.build_vae()
        torch.manual_seed(args.seed * 1000 + 2)
        self.text_encoder = M.build_text_encoder(len(self.tokenizer))
        torch.manual_seed(args.seed * 1000 + 3)
        self.transformer = M.build_transformer()
        self.moments: tuple[dict, dict] | None = None
        if self.resume is not None:
            from safetensors.torch import load_file

            load_into({"transformer": self.transformer}, load_file(str(self.resume / "transformer.safetensors")))
            load_into({"vae": self.vae, "text_encoder": self.text_encoder},
                      load_file(str(self.resume / "vae_text_encoder.safetensors")))
            moment_files = [self.resume / "optim_m.safetensors", self.resume / "optim_v.safetensors"]
            if self.state.get("optim_stage") and all(f.exists() for f in moment_files):
                self.moments = (load_file(str(moment_files[0])), load_file(str(moment_files[1])))
            elif self.state.get("optim_stage"):
                # the optimizer files were left behind (they are the largest): the stage in progress goes on
                # with fresh AdamW moments and a re-warmup of its learning rate
                self.log(f"no optimizer moments in {self.resume}: the {self.state['optim_stage']} stage continues "
                         "with fresh AdamW moments and a learning-rate re-warmup")
                stage = self.state[self.state["optim_stage"]]
                stage["warmup_from"] = stage["step"]
                self.state["optim_stage"] = None
            if self.state["vae"].get("latents_mean"):
                self.vae.register_to_config(latents_mean=self.state["vae"]["latents_mean"],
                                            latents_std=self.state["vae"]["latents_std"])
        for m in (self.vae, self.text_encoder, self.transformer):
            m.to(self.device)
        self.renderer = D.Renderer(self.device, photo_size=self.cfg.get("photo_size", 512))
        photos = list(D.available_photos())
        if self.state.setdefault("photos", photos) != photos:
            self.log(f"WARNING: photos available now {photos} differ from the run's {self.state['photos']}")
        self.log(f"device {self.device} ({environment(self.device).get('gpu', platform.processor())}), preset "
                 f"{args.preset}, seed {args.seed}; params: vae {M.count_params(self.vae):,}, text encoder "
                 f"{M.count_params(self.text_encoder):,}, transformer {M.count_params(self.transformer):,}; "
                 f"tokenizer {len(self.tokenizer)} tokens; startup {time.time() - self.t_start:.1f}s")

    # -- checkpointing --------------------------------------------------------------------------------
    def save(self, opt=None, named=None, stage: str | None = None) -> None:
        t = time.time()
        exact = self.args.checkpoint_dtype == "float32"

        def half(d):
            return checkpoint_tensors(d, exact)

        save_tensors(self.out / "transformer.safetensors",
                     half({n: p for n, p in named_params({"transformer": self.transformer})}),
                     {"format": "tiny-wan-train", "dtype": self.args.checkpoint_dtype})
        save_tensors(self.out / "vae_text_encoder.safetensors",
                     half({n: p for n, p in named_params({"vae": self.vae, "text_encoder": self.text_encoder})}),
                     {"format": "tiny-wan-train", "dtype": self.args.checkpoint_dtype})
        if opt is not None:
            self.moments = optimizer_moments(opt, named, torch.float32 if exact else torch.bfloat16)
            self.state["optim_stage"] = stage
            steps = [int(st["step"]) for st in opt.state.values() if "step" in st]
            self.state["optim_steps"] = max(steps) if steps else 0
        if self.moments is not None:
            m, v = self.moments  # the latest moments of the stage in progress (or last trained)
        else:
            m, v = {}, {}
            self.state["optim_stage"] = None
        save_tensors(self.out / "optim_m.safetensors", m, {"stage": self.state.get("optim_stage")})
        save_tensors(self.out / "optim_v.safetensors", v, {"stage": self.state.get("optim_stage")})
        self.state["saved"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.state["wall_seconds_this_call"] = round(time.time() - self.t_start, 1)
        # what this call did, for the model card's recipe: its time from the process start and the step counters
        self.state["calls"][-1].update(
            wall_seconds=round(time.time() - self.process_start, 1),
            steps={k: int(self.state[k]["step"]) for k in ("vae", "vae_decoder", "dit")})
        tmp = self.out / ".state.json.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.out / "state.json")
        (self.out / "loss_curve.tsv").write_text("stage\tstep\tloss\tlr\tseconds\n" + "\n".join(self.curve_rows) + "\n")
        for f in FILES:
            size = (self.out / f).stat().st_size
            if size > RETURN_LIMIT_BYTES:
                self.log(f"WARNING: {f} is {size / 1e6:.1f} MB, over the {RETURN_LIMIT_BYTES / 1e6:.0f} MB return limit"
                         + (" (--checkpoint-dtype float32 is for CPU checks)" if exact else ""))
        self.log(f"checkpoint saved ({time.time() - t:.1f}s)")

    # -- generic loop ---------------------------------------------------------------------------------
    def _run_stage(self, name: str, modules: dict, lr_peak: float, warmup: int, weight_decay: float,
                   minutes: float, max_steps: int | None, calib: tuple[int, int], step_fn,
                   reserve_s: float = 0.0, on_calibrated=None):
        """Train ``modules`` with ``step_fn(step) -> loss`` until the schedule ends or the time is up.

        Without ``max_steps`` the schedule length is planned from the measured speed after ``calib[1]``
        steps and re-planned at every log line until the cool-down starts (then it is frozen). When the
        time budget runs out the stage counts as finished (``stopped_by_budget``) so the next stage runs
        in the same call; a call killed from outside resumes from its last checkpoint instead, and so does a
        call paused by ``--stop-after-steps`` (the stage stays unfinished, its schedule unchanged).
        """
        st = self.state[name]
        named = named_params(modules)
        params = [p for _, p in named]
        opt = make_adamw(params, lr_peak, self.device, weight_decay)
        if self.moments is not None and self.state.get("optim_stage") == name:
            n = restore_moments(opt, named, *self.moments, step=self.state.get("optim_steps", st["step"]))
            self.log(f"[{name}] restored AdamW moments for {n}/{len(named)} tensors at step {st['step']}")
        st["stopped_by_budget"] = False
        if max_steps is not None and (st["total_steps"] != max_steps or not st.get("plan_fixed")):
            st["total_steps"] = max_steps
            st["cooldown_start"] = int(max_steps * (1.0 - COOLDOWN_FRACTION))
            st["plan_fixed"] = True
        fixed = bool(st.get("plan_fixed"))
        t0 = time.time()
        deadline = t0 + minutes * 60.0
        if self.deadline_total is not None:
            deadline = min(deadline, self.deadline_total - reserve_s)
        last_ckpt = time.time()
        step0 = st["step"]
        ema = None
        window = None  # (time, step) where speed measurement started
        t_log, s_log = time.time(), st["step"]
        for m in modules.values():
            m.train()
        while st["total_steps"] is None or st["step"] < st["total_steps"]:
            if self.steps_left is not None and self.steps_left <= 0:
                self.paused = True
                self.log(f"[{name}] pausing at step {st['step']} (--stop-after-steps); resume with --resume")
                break
            if time.time() >= deadline:
                st["stopped_by_budget"] = True
                self.log(f"[{name}] time budget reached at step {st['step']} of {st['total_steps']}")
                break
            step = st["step"]
            lr = lr_at(step, st, lr_peak, warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            loss = step_fn(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            st["step"] = step + 1
            if self.steps_left is not None:
                self.steps_left -= 1
            done_here = st["step"] - step0
            if done_here % self.cfg["curve_every"] == 0 or done_here <= 1:
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    raise FloatingPointError(f"[{name}] loss is {lv} at step {step}")
                ema = lv if ema is None else 0.9 * ema + 0.1 * lv
                self.curve_rows.append(f"{name}\t{st['step']}\t{lv:.5f}\t{lr:.3e}\t{st['seconds'] + time.time() - t0:.1f}")
            # plan (and re-plan until the cool-down starts) the schedule length from the measured speed
            if not fixed:
                if done_here == calib[0]:
                    window = (time.time(), st["step"])
                    if on_calibrated is not None:
                        on_calibrated("start")
                replan = done_here == calib[1] or (done_here > calib[1] and done_here % self.cfg["log_every"] == 0)
                frozen = st.get("cooldown_start") is not None and st["step"] >= st["cooldown_start"]
                if window is not None and replan and not frozen:
                    per_step = (time.time() - window[0]) / max(1, st["step"] - window[1])
                    if done_here == calib[1] and on_calibrated is not None:
                        per_step = on_calibrated(per_step, st["step"] - window[1])
                    remaining = int(BUDGET_SAFETY * (deadline - time.time()) / per_step)
                    first = st.get("calibrated_seconds_per_step") is None
                    plan_schedule(st, st["step"], remaining)
                    st["calibrated_seconds_per_step"] = per_step
                    if first or done_here == calib[1]:
                        self.log(f"[{name}] {per_step * 1000:.0f} ms/step -> schedule {st['total_steps']} steps, "
                                 f"cool-down from step {st['cooldown_start']}")
            if done_here % self.cfg["log_every"] == 0:
                dt = time.time() - t_log
                its = (st["step"] - s_log) / max(dt, 1e-9)
                t_log, s_log = time.time(), st["step"]
                self.log(f"[{name}] step {st['step']}/{st['total_steps'] or '?'} loss {ema:.4f} lr {lr:.2e} "
                         f"gnorm {float(gnorm):.2f} {its:.2f} it/s stage time {st['seconds'] + time.time() - t0:.0f}s")
            if time.time() - last_ckpt > self.cfg["ckpt_every_s"]:
                t_ck = time.time()
                st["seconds"] += t_ck - t0
                self.save(opt, named, name)
                spent = time.time() - t_ck
                deadline += spent  # checkpoint I/O is not charged to the budget...
                if self.deadline_total is not None:
                    deadline = min(deadline, self.deadline_total - reserve_s)  # ...unless the call's cap says so
                if window is not None:
                    window = (window[0] + spent, window[1])
                t0 = time.time()
                last_ckpt = time.time()
        st["seconds"] += time.time() - t0
        st["done"] = True if st.get("stopped_by_budget") else (st["total_steps"] is not None
                                                               and st["step"] >= st["total_steps"])
        st["final_loss_ema"] = ema
        for m in modules.values():
            m.eval()
        return opt, named

    # -- stage 1: VAE ---------------------------------------------------------------------------------
    def vae_step(self, step: int) -> torch.Tensor:
        c = self.cfg
        # clips cycle through vae_buckets: crops of a 256 render show objects at the default size's scale,
        # of a 128 render at the 17x128x128 scale; the long clips cover the default generation length
        b = c["vae_buckets"][step % len(c["vae_buckets"])]
        size = b["render"]
        video, _, _, cover = D.make_clips(self.renderer, self.args.seed, "vae", step, b["batch"], b["frames"],
                                          size, size, backgrounds=tuple(c["vae_backgrounds"]), with_mask=True)
        g = D.stream_generator(self.args.seed, "vae-noise", step, self.device)
        off = torch.randint(0, size - b["crop"] + 1, (2,), generator=g, device=self.device).tolist()
        crop = (slice(off[0], off[0] + b["crop"]), slice(off[1], off[1] + b["crop"]))
        x = video[..., crop[0], crop[1]].contiguous()
        # objects cover ~3% of the pixels but are what the prompts are about: weight their pixels up
        weight = 1.0 + c["vae_object_weight"] * cover[..., crop[0], crop[1]]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            post = V.encode(self.vae, x)
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=self.device,
                                                   dtype=post.mean.dtype)
            rec = V.decode(self.vae, z)
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return reconstruction_loss(rec, x, weight) + 1e-4 * kl

    def train_vae(self) -> None:
        st = self.state["vae"]
        if st["done"]:
            self.log(f"[vae] already trained ({st['step']} steps)")
            return
        self.vae.requires_grad_(True)
        c = self.cfg
        clips = ", ".join(f"{b['batch']} x {b['frames']}x{b['crop']}^2 of {b['render']}" for b in c["vae_buckets"])
        self.log(f"[vae] training: clips (batch x frames x crop of render) {clips}, budget {self.args.vae_minutes} min")
        opt, named = self._run_stage("vae", {"vae": self.vae}, c["vae_lr"], c["vae_warmup"], 0.0,
                                     self.args.vae_minutes, self.args.vae_steps, c["calib_vae"], self.vae_step)
        if st["done"]:
            self.vae_statistics()
        if st["done"]:
            self.moments = None  # the VAE moments are no longer needed
            self.save()
        else:
            self.save(opt, named, "vae")

    def vae_decoder_step(self, step: int) -> torch.Tensor:
        """Decoder-only fine-tune on whole frames at the generation sizes: the encoder (hence the latent space
        the transformer learns, and the latent statistics) stays fixed. The decoder decodes the posterior
        mode, as it does in the pipeline, with the VAE stage's object-weighted loss."""
        c = self.cfg
        b = c["vae_dec_buckets"][step % len(c["vae_dec_buckets"])]
        x, _, _, cover = D.make_clips(self.renderer, self.args.seed, "vae-decoder", step, b["batch"], b["frames"],
                                      b["height"], b["width"], backgrounds=tuple(c["vae_backgrounds"]),
                                      with_mask=True)
        weight = 1.0 + c["vae_object_weight"] * cover
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                z = V.encode(self.vae, x).mode()
            rec = V.decode(self.vae, z)
        return reconstruction_loss(rec, x, weight)

    def train_vae_decoder(self) -> None:
        st = self.state["vae_decoder"]
        minutes, steps = self.args.vae_decoder_minutes, self.args.vae_decoder_steps
        if self.args.more_vae_decoder_minutes:
            if not st["done"]:
                raise SystemExit("--more-vae-decoder-minutes extends a finished decoder fine-tune; this one is "
                                 "unfinished or never ran: use --vae-decoder-minutes")
            # a second schedule on top of the finished one: LR re-warmup from here, then a new cool-down
            minutes, steps = self.args.more_vae_decoder_minutes, None
            st["warmup_from"] = st["step"]
            st["done"] = False
            st["total_steps"] = st["cooldown_start"] = None
            st["plan_fixed"] = False
            st.pop("calibrated_seconds_per_step", None)
            st.setdefault("extensions", []).append({"from_step": st["step"], "minutes": minutes})
            self.log(f"[vae-decoder] extending the decoder fine-tune by {minutes} min")
        if not (minutes or steps) or st["done"] or not self.state["vae"]["done"]:
            return
        c = self.cfg
        self.vae.requires_grad_(False)
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)
        self.log(f"[vae-decoder] fine-tuning the decoder on whole frames "
                 f"{[(b['frames'], b['height'], b['width'], b['batch']) for b in c['vae_dec_buckets']]}, budget "
                 f"{minutes} min (encoder frozen: the latent space does not change)")
        modules = {"vae.decoder": self.vae.decoder, "vae.post_quant_conv": self.vae.post_quant_conv}
        opt, named = self._run_stage("vae_decoder", modules, c["vae_dec_lr"], c["vae_dec_warmup"], 0.0,
                                     minutes or 1e9, steps, c["calib_vae_dec"], self.vae_decoder_step)
        self.vae.requires_grad_(False)
        self.vae.eval()
        if st["done"]:
            self.vae_quality(st, "vae-decoder")
            self.moments = None
            self.save()
        else:
            self.save(opt, named, "vae_decoder")

    @torch.no_grad()
    def vae_statistics(self) -> None:
        """Latent mean/std per channel (into the VAE config) and held-out reconstruction PSNR."""
        c = self.cfg
        t = time.time()
        self.vae.eval()
        f, h, w = c["dit_buckets"][0]["frames"], c["dit_buckets"][0]["height"], c["dit_buckets"][0]["width"]
        zs = []
        for i in range(0, c["stats_clips"], c["eval_batch"]):
            video, _, _ = D.make_clips(self.renderer, self.args.seed, "vae-stats", i, c["eval_batch"], f, h, w)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                zs.append(self.vae.encode(video).latent_dist.mode().float())
        z = torch.cat(zs)
        mean = z.mean(dim=(0, 2, 3, 4))
        std = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
        self.vae.register_to_config(latents_mean=[round(float(v), 5) for v in mean],
                                    latents_std=[round(float(v), 5) for v in std])
        st = self.state["vae"]
        st["latents_mean"], st["latents_std"] = self.vae.config.latents_mean, self.vae.config.latents_std
        self.log(f"[vae] latent std {[round(float(v), 2) for v in std]} ({time.time() - t:.1f}s)")
        self.vae_quality(st)

    @torch.no_grad()
    def vae_quality(self, st: dict, tag: str = "vae") -> None:
        """Held-out reconstruction PSNR and the evaluation's checks on correct answers through the VAE, into
        ``st`` (the VAE stage's or the decoder fine-tune's state)."""
        c = self.cfg
        t = time.time()
        self.vae.eval()
        pf, ph, pw = c["psnr_size"]
        st["heldout"] = E.vae_reconstruction(self.vae, self.renderer, self.args.seed, c["psnr_clips"], pf, ph, pw,
                                             batch=c["eval_batch"], autocast=False)
        self.log(f"[{tag}] held-out reconstruction PSNR {st['heldout']['psnr']:.2f} dB "
                 f"{ {k: round(v, 2) for k, v in st['heldout']['psnr_by_kind'].items()} } on {c['psnr_clips']} clips "
                 f"{pf}x{ph}x{pw} ({time.time() - t:.1f}s)")
        # the evaluation's colour / direction checks on correct answers to the held-out prompts, rendered and
        # through this VAE: the ceiling a perfect transformer could reach (tells a VAE that loses the small
        # objects from an under-trained transformer)
        st["heldout_reference"] = {}
        for rf, rh, rw in c["eval_sizes"]:
            ref = E.heldout_reference(self.vae, self.renderer, rf, rh, rw, seed=self.args.seed)
            st["heldout_reference"][f"{rf}x{rh}x{rw}"] = ref
            self.log(f"[{tag}] held-out prompts' correct answers at {rf}x{rh}x{rw}: rendered colour "
                     f"{ref['render']['colour_ok']} direction {ref['render']['direction_ok']} object fraction "
                     f"{ref['render']['mean_object_fraction']:.4f}; through the VAE colour {ref['vae']['colour_ok']} "
                     f"direction {ref['vae']['direction_ok']} object fraction {ref['vae']['mean_object_fraction']:.4f} "
                     f"PSNR {ref['vae']['psnr']:.2f} dB (objects erased: {ref['objects_erased_psnr']:.2f} dB)")

    # -- stage 2: text encoder + transformer -----------------------------------------------------------
    def _latent_batch(self, data_step: int):
        c = self.cfg
        rng = D.stream_rng(self.args.seed, "dit-bucket", data_step)
        b = rng.choices(c["dit_buckets"], weights=[x["weight"] for x in c["dit_buckets"]])[0]
        video, captions, _, cover = D.make_clips(self.renderer, self.args.seed, "dit", data_step, b["batch"],
                                                 b["frames"], b["height"], b["width"], with_mask=True)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            z = V.encode(self.vae, video, max_batch=V.ENCODE_MAX_BATCH).mode()
        weight = 1.0 + c["dit_object_weight"] * latent_grid_mask(cover, z.shape[-3:])
        return M.normalize_latents(self.vae, z.float()), captions, weight

    def _reuse_schedule(self) -> list:
        """[[from_step, reuse, first_data_index], ...]: how many steps each encoded batch serves."""
        return self.state["dit"].setdefault("reuse_schedule", [[0, self.cfg["latent_reuse"], 0]])

    def _data_index(self, step: int) -> int:
        for s0, reuse, base in reversed(self._reuse_schedule()):
            if step >= s0:
                return base + (step - s0) // reuse
        raise AssertionError(step)

    def _shift_schedule(self) -> list:
        """[[from_step, shift], ...]: the flow shift of the training noise levels (:func:`model.sample_sigmas`)
        from each step on; ``--dit-shift`` on a later call appends an entry."""
        return self.state["dit"].setdefault("shift_schedule", [[0, M.TRAIN_SHIFT]])

    def _shift_at(self, step: int) -> float:
        return next(shift for s0, shift in reversed(self._shift_schedule()) if step >= s0)

    def _adapt_reuse(self, arg, window_steps: int | None = None):
        """Calibration hook: time the data path (render + VAE encode) and pick the latent reuse (1-8) whose
        share of a batch's production per step stays under half the transformer step, unless
        --latent-reuse fixed it. The transformer step is the measured step less the time the loop waited for
        data (all of the data time without --prefetch, only the stalls with it)."""
        pf = self._prefetch
        if arg == "start":
            self._data_mark = (pf.stall_s, pf.produce_s, pf.batches)
            return None
        per_step = arg
        stall0, produce0, seen0 = self._data_mark
        batches = pf.batches - seen0
        if self.args.latent_reuse is not None or batches == 0:
            return per_step
        sched = self._reuse_schedule()
        t_data = (pf.produce_s - produce0) / batches
        t_train = max(1e-4, per_step - (pf.stall_s - stall0) / max(1, window_steps))
        reuse = next((r for r in range(1, MAX_LATENT_REUSE + 1) if t_data / r <= 0.5 * t_train), MAX_LATENT_REUSE)
        step = self.state["dit"]["step"]
        self.state["dit"]["measured_ms"] = {"data_per_batch": round(t_data * 1000, 1),
                                           "train_per_step": round(t_train * 1000, 1)}
        if reuse != sched[-1][1]:
            sched.append([step, reuse, self._data_index(step - 1) + 1])
        self.log(f"[dit] data {t_data * 1000:.0f} ms/batch, train {t_train * 1000:.0f} ms/step -> latent reuse {reuse}")
        return t_train + (0.0 if pf.enabled else t_data / reuse)

    def dit_step(self, step: int) -> torch.Tensor:
        c = self.cfg
        data_step = self._data_index(step)
        if self._cached_step != data_step:
            self._cached = self._prefetch.get(data_step)
            self._cached_step = data_step
        latents, captions, weight = self._cached
        rng = D.stream_rng(self.args.seed, "dit-drop", step)
        captions = ["" if rng.random() < c["caption_dropout"] else cap for cap in captions]
        g = D.stream_generator(self.args.seed, "dit-noise", step, self.device)
        sigmas = M.sample_sigmas(latents.shape[0], g, self.device, shift=self._shift_at(step))
        noise = torch.randn(latents.shape, generator=g, device=self.device)
        noisy, timesteps, target = M.flow_targets(latents, noise, sigmas)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            # exactly the pipeline's 512-position conditioning, in compact form (see encode_prompts_compact)
            emb, bias = M.encode_prompts_compact(self.text_encoder, self.tokenizer, captions, self.device,
                                                 min_slots=c["text_slots"])
            self._set_bias(bias)
            pred = self.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=emb,
                                    return_dict=False)[0]
        # velocity MSE with the latent cells that hold an object weighted up (the per-cell optimum is still
        # the conditional mean velocity, so the sampler's contract is unchanged)
        return ((pred.float() - target).pow(2) * weight).mean() / weight.mean()

    def _final_reserve_s(self) -> float:
        """Seconds the transformer stage leaves before ``--total-minutes`` for what follows it: the held-out
        evaluation and the last save, or only the save with ``--no-eval``."""
        reserve = FINAL_RESERVE_S[self.args.preset]
        return min(10.0, reserve) if self.args.no_eval else reserve

    def _compile_for_training(self) -> list:
        """:func:`model.compile_for_training` on CUDA with ``--compile`` (auto: the preset's ``compile``);
        returns the compiled modules (to undo it afterwards)."""
        mode = self.args.compile
        on = self.device.type == "cuda" and self.cfg.get("compile", False) if mode == "auto" else mode == "on"
        if not on:
            return []
        modules = M.compile_for_training(self.transformer, self.text_encoder)
        self.log(f"[dit] torch.compile on the {len(modules) - 1} transformer blocks and the text encoder (compiled "
                 "on first use per bucket)")
        return modules

    def train_dit(self) -> None:
        st = self.state["dit"]
        minutes = self.args.dit_minutes
        if self.args.more_dit_steps or self.args.more_dit_minutes:
            if not st["done"]:
                raise SystemExit("--more-dit-steps/--more-dit-minutes extend a finished transformer stage; this one "
                                 "is unfinished: resume it with --resume alone")
            # a second schedule on top of the finished one: LR re-warmup from here, then a new cool-down
            st["warmup_from"] = st["step"]
            st["done"] = False
            st.setdefault("extensions", []).append({"from_step": st["step"], "steps": self.args.more_dit_steps,
                                                    "minutes": self.args.more_dit_minutes})
            if self.args.more_dit_steps:
                n = self.args.more_dit_steps
                st["total_steps"] = st["step"] + n
                st["cooldown_start"] = st["step"] + int(n * (1.0 - COOLDOWN_FRACTION))
                st["plan_fixed"] = True
                self.log(f"[dit] extending the schedule to {st['total_steps']} steps")
            else:
                minutes = self.args.more_dit_minutes
                st["total_steps"] = st["cooldown_start"] = None
                st["plan_fixed"] = False
                st.pop("calibrated_seconds_per_step", None)
                self.log(f"[dit] extending the schedule by {minutes} min (planned from the measured speed)")
        if st["done"]:
            self.log(f"[dit] already trained ({st['step']} steps)")
            return
        if not self.state["vae"]["done"]:
            self.log("[dit] skipped: the VAE stage has not finished (resume with more --vae-minutes)")
            return
        c = self.cfg
        sched = self._reuse_schedule()
        if self.args.latent_reuse is not None and sched[-1][1] != self.args.latent_reuse and st["step"] > 0:
            # a resumed or extended stage takes this call's --latent-reuse from its current step on
            sched.append([st["step"], self.args.latent_reuse, self._data_index(st["step"] - 1) + 1])
        shifts = self._shift_schedule()
        if self.args.dit_shift is not None and shifts[-1][1] != self.args.dit_shift:
            if shifts[-1][0] == st["step"]:
                shifts[-1][1] = self.args.dit_shift
            else:
                shifts.append([st["step"], self.args.dit_shift])
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.requires_grad_(True)
        self.transformer.requires_grad_(True)
        self.log(f"[dit] training text encoder + transformer: buckets "
                 f"{[(b['frames'], b['height'], b['width'], b['batch'], b['weight']) for b in c['dit_buckets']]}, "
                 f"latent reuse {self._reuse_schedule()[-1][1]}, noise-level shift {self._shift_schedule()[-1][1]:g}, "
                 f"budget {minutes} min")
        compiled = self._compile_for_training()
        prefetch = self.args.prefetch == "on" or (self.args.prefetch == "auto" and self.device.type == "cuda")
        self._prefetch = Prefetcher(self._latent_batch, self.device, prefetch)
        self._cached, self._cached_step = None, None
        try:
            with M.training_attention(self.transformer) as self._set_bias:
                opt, named = self._run_stage(
                    "dit", {"text_encoder": self.text_encoder, "transformer": self.transformer}, c["dit_lr"],
                    c["dit_warmup"], 0.01, minutes, None if st.get("extensions") else self.args.dit_steps,
                    c["calib_dit"], self.dit_step,
                    reserve_s=self._final_reserve_s(), on_calibrated=self._adapt_reuse)
        finally:
            self._prefetch.close()
            for m in compiled:  # the evaluation and the saved model run the plain modules
                m._compiled_call_impl = None
        pf = self._prefetch
        self.log(f"[dit] data: {pf.batches} batches, {pf.produce_s / max(1, pf.batches) * 1000:.0f} ms each to produce, "
                 f"the training loop waited {pf.stall_s:.1f}s for them in all (prefetch {'on' if pf.enabled else 'off'})")
        self._cached, self._cached_step = None, None
        self.save(opt, named, "dit")

    # -- final evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def final_eval(self) -> None:
        if not (self.state["vae"]["done"] and self.state["dit"]["done"]):
            return
        c = self.cfg
        t = time.time()
        pipe = M.assemble_pipeline(self.tokenizer, self.text_encoder, self.vae, self.transformer)
        pipe.set_progress_bar_config(disable=True)
        results = {}
        for f, h, w in c["eval_sizes"]:
            if self.deadline_total is not None and time.time() > self.deadline_total - 10:
                self.log("final evaluation cut short by --total-minutes")
                break
            r = E.evaluate_prompts(pipe, D.heldout_prompts()[: c.get("eval_prompts", 8)], f, h, w, c["eval_steps"],
                                   c["eval_guidance"],
                                   seed=self.args.seed,
                                   deadline=None if self.deadline_total is None else self.deadline_total - 8)
            results[f"{f}x{h}x{w}"] = r
            self.log(f"[eval] held-out prompts at {f}x{h}x{w}, {c['eval_steps']} steps, guidance "
                     f"{c['eval_guidance']}: colour {r['colour_ok']}, "
                     f"direction {r['direction_ok']}, mean hue error {r['mean_hue_error']:.1f} deg, object fraction "
                     f"{r['mean_object_fraction']:.4f}, "
                     f"{r['seconds_per_video']:.2f} s/video")
            if (f, h, w) != tuple(c["eval_sizes"][0]):
                continue
            for gs in c.get("eval_guidances", []):  # other guidance scales at the first (cheapest) size
                if self.deadline_total is not None and time.time() > self.deadline_total - 15:
                    break
                r = E.evaluate_prompts(pipe, D.heldout_prompts()[: c.get("eval_prompts", 8)], f, h, w,
                                       c["eval_steps"], gs, seed=self.args.seed,
                                       deadline=None if self.deadline_total is None else self.deadline_total - 8)
                results[f"{f}x{h}x{w}@guidance{gs:g}"] = r
                self.log(f"[eval] held-out prompts at {f}x{h}x{w}, guidance {gs:g}: colour {r['colour_ok']}, "
                         f"direction {r['direction_ok']}, mean hue error {r['mean_hue_error']:.1f} deg, object "
                         f"fraction {r['mean_object_fraction']:.4f}")
        self.state["eval"] = results
        self.state["calls"][-1]["eval"] = {k: {"colour_ok": r["colour_ok"], "direction_ok": r["direction_ok"]}
                                           for k, r in results.items()}
        self.log(f"[eval] done ({time.time() - t:.1f}s)")
        self.save()

    def run(self) -> None:
        self.train_vae()
        self.train_vae_decoder()
        self.train_dit()
        if self.paused:
            self.state["calls"][-1]["paused_at"] = {k: self.state[k]["step"] for k in ("vae", "dit")}
            self.save()  # moments of the paused stage are kept (self.moments)
        if not self.args.no_eval:
            self.final_eval()
        if self.args.export and self.state["vae"]["done"] and self.state["dit"]["done"]:
            from sagevideo.recipes.tiny_wan.assemble import assemble

            assemble(self.out, self.args.export, measure_cpu=False)
            self.log(f"pipeline exported to {self.args.export}")
        self.log(f"finished: vae {self.state['vae']['step']}/{self.state['vae']['total_steps']} steps, "
                 f"dit {self.state['dit']['step']}/{self.state['dit']['total_steps']} steps, "
                 f"wall {time.time() - self.t_start:.0f}s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (checkpoints, logs, final weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-minutes", type=float, default=2.5, help="wall-clock budget of the VAE stage")
    p.add_argument("--dit-minutes", type=float, default=5.2, help="budget of the text encoder + transformer stage")
    p.add_argument("--total-minutes", type=float, default=None,
                   help="hard cap for the whole call; the transformer stage ends early to leave time for eval + save")
    p.add_argument("--vae-steps", type=int, default=None, help="fix the VAE schedule length instead of timing it")
    p.add_argument("--dit-steps", type=int, default=None, help="fix the transformer schedule length")
    p.add_argument("--more-dit-steps", type=int, default=None,
                   help="with --resume of a finished run: train the text encoder + transformer N more steps "
                        "(the LR returns to its peak, then cools down over the last 20%%)")
    p.add_argument("--more-dit-minutes", type=float, default=None,
                   help="with --resume of a finished run: train the text encoder + transformer for about M more "
                        "minutes (step count planned from the measured speed; LR re-warmup, then a new cool-down)")
    p.add_argument("--vae-decoder-minutes", type=float, default=None,
                   help="after the VAE stage: fine-tune the VAE decoder alone for M minutes on whole frames at the "
                        "generation sizes (the encoder and the latent space stay fixed, so a trained transformer "
                        "stays valid); runs before any transformer training of the same call")
    p.add_argument("--vae-decoder-steps", type=int, default=None, help="fix the decoder fine-tune's length")
    p.add_argument("--more-vae-decoder-minutes", type=float, default=None,
                   help="with --resume of a run whose decoder fine-tune has finished: fine-tune the decoder about M "
                        "more minutes (LR re-warmup, then a new cool-down); the encoder and the latent space stay "
                        "fixed, so the trained transformer stays valid")
    p.add_argument("--latent-reuse", type=int, default=None, help="steps per encoded latent batch (default: preset)")
    p.add_argument("--dit-shift", type=float, default=None,
                   help="flow shift of the transformer's training noise levels from this call's first step on "
                        f"(default: the run's current value, {M.TRAIN_SHIFT:g} at the start; larger puts more "
                        "steps at high noise, where layout and motion are decided; the scheduler samples with "
                        f"{M.FLOW_SHIFT:g})")
    p.add_argument("--stop-after-steps", type=int, default=None,
                   help="pause this call after N optimizer steps (both stages counted), leaving the stage in "
                        "progress unfinished; --resume continues it exactly where it stopped")
    p.add_argument("--checkpoint-dtype", choices=("half", "float32"), default="half",
                   help="'half' (default): weights fp16, AdamW moments bf16, so every file stays under 16 MB; "
                        "'float32': exact checkpoints (resume reproduces an uninterrupted run bit for bit on "
                        "CPU), files over 16 MB")
    p.add_argument("--resume", default=None, help="a previous --out folder to continue from")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full",
                   help="'full' is the real recipe; 'smoke' runs the same flow on tiny clips (CPU check)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out prompt evaluation at the end")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the transformer blocks while training them (auto: on CUDA, if the preset "
                        "says so)")
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                   help="produce the next latent batch (render + VAE encode) in a worker thread, on its own CUDA "
                        "stream, while the transformer trains on the current one (auto: on CUDA); the batches "
                        "are the same either way")
    p.add_argument("--export", default=None, help="also write the assembled pipeline folder here")
    args = p.parse_args(argv)
    if args.dit_shift is not None and not args.dit_shift > 0:
        p.error(f"--dit-shift must be positive, got {args.dit_shift}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in state.json (the card's recipe)
    return args


def main(argv=None) -> None:
    Trainer(parse_args(argv)).run()


if __name__ == "__main__":
    main()

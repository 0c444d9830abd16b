"""Time the recipe's training steps against batch size and ``torch.compile`` on this GPU (a few minutes).

::

    python -m sagevideo.recipes.tiny_wan.speed_probe --minutes 2.5

The tiny models are small enough that an eager training step can be bound by the host (thousands of small
kernel launches per VAE step) rather than by the GPU; then a larger batch costs little more time per step and
``torch.compile`` pays for itself. This prints, for the VAE step (render + encode + decode + backward + AdamW)
and the transformer step (text encoder + transformer + backward + AdamW on cached latents) and the data path
(render + VAE encode), the milliseconds per step and the clips per second at each batch size, eager and
compiled (compile time reported separately), so the recipe's batch sizes can be chosen from measurements.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from sagevideo.recipes.tiny_wan import data as D
from sagevideo.recipes.tiny_wan import model as M
from sagevideo.recipes.tiny_wan import vae as V
from sagevideo.recipes.tiny_wan.train import PRESETS


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, warm: int, reps: int) -> tuple[float, float]:
    """(seconds of the warm-up calls, median seconds per call afterwards)."""
    _sync()
    t = time.time()
    for _ in range(warm):
        fn()
    _sync()
    t_warm = time.time() - t
    times = []
    for _ in range(reps):
        t = time.time()
        fn()
        _sync()
        times.append(time.time() - t)
    times.sort()
    return t_warm, times[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.5, help="stop starting new measurements after this")
    p.add_argument("--vae-batches", type=int, nargs="*", default=[32, 64, 128, 192])
    p.add_argument("--dit-batches", type=int, nargs="*", default=[32, 64, 128, 192])
    p.add_argument("--compile", choices=("none", "dit", "all"), default="dit",
                   help="also time compiled steps: none, the transformer only, or the VAE too (its compile "
                        "takes minutes: the causal chunk loop is traced for each chunk)")
    p.add_argument("--data-batches", type=int, nargs="*", default=[32, 64])
    args = p.parse_args(argv)
    t_end = time.time() + 60 * args.minutes
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    renderer = D.Renderer(dev, photo_size=512)
    tok = M.wrap_tokenizer(M.train_tokenizer())
    rows = []

    def report(name, batch, warm, per):
        clips = batch / per
        rows.append((name, batch, warm, per))
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
        print(f"{name:28s} batch {batch:4d}: warm-up {warm:6.1f} s, {per * 1000:7.1f} ms/step, {clips:7.1f} clips/s, "
              f"peak {mem:5.1f} GiB", flush=True)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    for compiled in ([False] if args.compile == "none" else [False, True]):
        torch.manual_seed(0)
        skip_vae = compiled and args.compile != "all"
        vae = M.build_vae().to(dev)
        if compiled:
            vae.encoder.compile()
            vae.decoder.compile()
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-4, fused=dev.type == "cuda")
        tag = "vae compiled" if compiled else "vae eager"
        for batch in args.vae_batches:
            if time.time() > t_end or skip_vae:
                break
            video, _, _ = D.make_clips(renderer, 0, "vae", 0, batch, 9, 128, 128)

            def step():
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    post = V.encode(vae, video)  # the recipe's whole-clip passes
                    rec = V.decode(vae, post.mean + post.std * torch.randn_like(post.mean))
                loss = (rec.float() - video).abs().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            try:
                warm, per = _time(step, 3 if compiled else 2, 5)
                report(tag, batch, warm, per)
            except Exception as exc:  # noqa: BLE001
                print(f"{tag} batch {batch}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                torch.cuda.empty_cache()
                break

        # the data path of the transformer stage: render + encode one batch at the default size
        for batch in args.data_batches:
            if time.time() > t_end or skip_vae:
                break

            def data():
                v, _, _ = D.make_clips(renderer, 0, "dit", 1, batch, 33, 256, 256)
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    V.encode(vae, v, max_batch=V.ENCODE_MAX_BATCH).mode()

            try:
                warm, per = _time(data, 2, 3)
                report(("data compiled" if compiled else "data eager") + " 33x256", batch, warm, per)
            except Exception as exc:  # noqa: BLE001
                print(f"data batch {batch}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                break
        del vae, opt
        torch.cuda.empty_cache()

        torch.manual_seed(0)
        te = M.build_text_encoder(len(tok)).to(dev)
        tr = M.build_transformer().to(dev)
        if compiled:
            M.compile_for_training(tr, te)
        slots = PRESETS["full"]["text_slots"]  # the recipe's fixed text length
        params = list(te.parameters()) + list(tr.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
        captions = [s.caption for s in D.SceneSampler().batch(0, "dit", 0, max(args.dit_batches, default=1), 33, 256, 256)]
        tag = "dit compiled" if compiled else "dit eager"
        with M.training_attention(tr) as set_bias:
            for (f, h, w) in ((9, 32, 32), (5, 16, 16)):
                for batch in args.dit_batches:
                    if time.time() > t_end:
                        break
                    lat = torch.randn(batch, 16, f, h, w, device=dev)
                    caps = captions[:batch]

                    def step():
                        g = torch.Generator(device=dev).manual_seed(1)
                        sig = M.sample_sigmas(batch, g, dev)
                        noisy, ts, target = M.flow_targets(lat, torch.randn_like(lat), sig)
                        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                            emb, bias = M.encode_prompts_compact(te, tok, caps, dev, min_slots=slots)
                            set_bias(bias)
                            pred = tr(hidden_states=noisy, timestep=ts, encoder_hidden_states=emb, return_dict=False)[0]
                        loss = F.mse_loss(pred.float(), target)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        opt.step()

                    try:
                        warm, per = _time(step, 3 if compiled else 2, 6)
                        report(f"{tag} latent {f}x{h}x{w}", batch, warm, per)
                    except Exception as exc:  # noqa: BLE001
                        print(f"{tag} batch {batch}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                        torch.cuda.empty_cache()
                        break
        del te, tr, opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

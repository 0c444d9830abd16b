"""The bundled tiny text-to-video model (``assets/tiny-wan``) on the CPU, offline.

* it loads with ``WanPipeline.from_pretrained`` with the hub offline, from safetensors only, within 40 MB;
* it generates the requested number of frames at the requested size (non-square and the default size);
* a fixed seed gives identical output on the CPU, another seed a different one;
* text conditioning works on *held-out* prompts - (colour, shape, direction) triples never seen in
  training: the dominant hue of the frames is nearest the colour word, and the object's centroid moves
  the stated way;
* the shape word changes the silhouette the way the shapes' geometry predicts: each held-out prompt against
  the same prompt and seed with only the shape word changed (square / circle / triangle among themselves,
  the diamond and the star against a circle), the square fills more of its bounding box than the circle,
  the circle more than the triangle, diamond or star, and the triangle is more bottom-heavy (apex up) than
  the square and the circle - in at least 24 of these 26 orderings, by a clear mean margin. The statistics
  (``evaluate.silhouette``) order the rendered training shapes the same way (checked here too). Diamond
  against star and the ring's hole are not checked (not reliable enough, see the model card).

Videos for the conditioning checks are 17x128x128 (a trained size, 320 video tokens) at 16 steps, so
the file runs in about two minutes on two cores. All tests skip while the asset has not been
trained yet (``python -m sagevideo.recipes.tiny_wan.train`` on a GPU, then ``...tiny_wan.assemble``); the
recipe itself is tested on the CPU by ``tests/test_tiny_wan_recipe.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SAGEVIDEO_TINY_WAN_PATH points the tests at another pipeline folder (e.g. a candidate before it is copied
# into assets/).
ASSET = Path(os.environ.get("SAGEVIDEO_TINY_WAN_PATH", Path(__file__).resolve().parents[1] / "assets" / "tiny-wan"))

pytestmark = pytest.mark.skipif(
    not (ASSET / "model_index.json").exists(),
    reason=f"{ASSET} holds no trained pipeline yet: train it on a GPU with "
    "`python -m sagevideo.recipes.tiny_wan.train` (the jobs in that module's docstring), then "
    "`python -m sagevideo.recipes.tiny_wan.assemble --from OUT "
    "--to assets/tiny-wan`",
)

FRAMES, HEIGHT, WIDTH = 17, 128, 128
STEPS = 16
GUIDANCE = 5.0
MIN_PASS = 6  # of the 8 held-out prompts, for each of colour and direction
# Shape-word orderings (evaluate.SHAPE_ORDERINGS) checked by test_changing_only_the_shape_word_...: 26 in all (4 in
# each of the six square/circle/triangle groups, 1 each for the diamond and the star). Measured on 80 groups
# (the 8 held-out (colour, direction) pairs x seeds 0-9, all six shapes: 480 videos at these settings) the
# orderings held 466 times of 480 on the 2026-11-24 model (479 on the 2026-11-23 one); the test's design repeated
# with the seeds offset by 0-9 gave 26/26 six times, 25/26 twice and 24/26 twice (offset 0, the test: 26/26).
# A model that ignored the shape word would pass each ordering about half the time.
MIN_SHAPE_ORDERINGS = 24
# Mean margin (fill ratio, or bottom-heaviness in bounding-box heights) each square/circle/triangle ordering must
# reach over its six groups; measured: 0.04-0.12 for the test's design on the ten seed offsets (2026-11-24 model;
# 0.06-0.13 on the 2026-11-23 one), while changing only the seed moves a circle's fill ratio by about 0.011
# (standard deviation, measured on the 2026-11-23 model).
MIN_MEAN_SHAPE_MARGIN = 0.03


@pytest.fixture(scope="module")
def pipe():
    import huggingface_hub.constants as hub_constants
    from diffusers import WanPipeline

    from sagevideo.recipes.tiny_wan import dtype_kwarg

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
        p = WanPipeline.from_pretrained(str(ASSET), **dtype_kwarg(torch.float32))
    p.set_progress_bar_config(disable=True)
    for name in ("vae", "text_encoder", "transformer"):
        getattr(p, name).eval()
    return p


def _generate(pipe, prompt, seed, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, guidance=GUIDANCE):
    out = pipe(
        prompt=prompt,
        num_frames=frames,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    )
    return out.frames


@pytest.fixture(scope="module")
def heldout_videos(pipe):
    from sagevideo.recipes.tiny_wan.data import heldout_prompts

    return [(p, _generate(pipe, p["prompt"], seed=i)[0]) for i, p in enumerate(heldout_prompts())]


def test_asset_is_safetensors_only_and_small():
    files = [p for p in ASSET.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    total = sum(p.stat().st_size for p in files)
    assert total <= 40 * 2**20, f"{total / 2**20:.1f} MiB"
    assert (ASSET / "README.md").exists(), "model card missing"


def test_loads_offline_with_all_parts(pipe):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    assert pipe.tokenizer.pad_token_id == 0 and pipe.tokenizer.eos_token_id == 1
    for name in ("vae", "text_encoder", "transformer"):
        assert all(p.dtype == torch.float32 for p in getattr(pipe, name).parameters()), name
    # the default size gives at least ~2,000 video tokens
    cfg = pipe.transformer.config
    lat_t, lat_h, lat_w = (33 - 1) // 4 + 1, 256 // 8, 256 // 8
    tokens = (lat_t // cfg.patch_size[0]) * (lat_h // cfg.patch_size[1]) * (lat_w // cfg.patch_size[2])
    assert tokens >= 2000, tokens


def test_generates_requested_frames_and_size(pipe):
    video = _generate(pipe, "a green circle moves right quickly on a black background.", seed=0,
                      frames=9, height=96, width=160, steps=4)
    assert video.shape == (1, 9, 96, 160, 3)
    assert np.isfinite(video).all() and video.min() >= 0.0 and video.max() <= 1.0
    assert video.std() > 0.01  # not a blank frame


def test_generates_default_size(pipe):
    from sagevideo.recipes.tiny_wan import DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH

    # two steps without guidance keeps this quick; the full decode still runs at 33x256x256
    video = _generate(pipe, "the camera pans left across a photo of a cat.", seed=0, frames=DEFAULT_FRAMES,
                      height=DEFAULT_HEIGHT, width=DEFAULT_WIDTH, steps=2, guidance=1.0)
    assert video.shape == (1, DEFAULT_FRAMES, DEFAULT_HEIGHT, DEFAULT_WIDTH, 3)


def test_fixed_seed_is_deterministic_on_cpu(pipe):
    prompt = "a purple star moves down slowly on a white background."
    a = _generate(pipe, prompt, seed=123, frames=9, height=64, width=64, steps=6)
    b = _generate(pipe, prompt, seed=123, frames=9, height=64, width=64, steps=6)
    c = _generate(pipe, prompt, seed=124, frames=9, height=64, width=64, steps=6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_colour_word_sets_dominant_hue_on_heldout_prompts(heldout_videos):
    from sagevideo.recipes.tiny_wan.evaluate import check_video

    results = [(p, check_video(v, colour=p["colour"])) for p, v in heldout_videos]
    passed = sum(r["colour_ok"] for _, r in results)
    detail = [(p["prompt"], r["nearest_colour"], round(r["hue"], 1)) for p, r in results]
    assert passed >= MIN_PASS, detail
    # each colour word is honoured at least once (two prompts per colour)
    for colour in {p["colour"] for p, _ in results}:
        assert any(r["colour_ok"] for p, r in results if p["colour"] == colour), (colour, detail)


def test_direction_word_sets_motion_on_heldout_prompts(heldout_videos):
    from sagevideo.recipes.tiny_wan.evaluate import check_video

    results = [(p, check_video(v, direction=p["direction"])) for p, v in heldout_videos]
    passed = sum(r["direction_ok"] for _, r in results)
    detail = [(p["prompt"], round(r["dx"], 3), round(r["dy"], 3)) for p, r in results]
    assert passed >= MIN_PASS, detail
    for direction in {p["direction"] for p, _ in results}:
        assert any(r["direction_ok"] for p, r in results if p["direction"] == direction), (direction, detail)


def test_changing_only_the_colour_word_changes_the_hue(pipe):
    from sagevideo.recipes.tiny_wan.evaluate import check_video

    # same seed, same shape and direction (a held-out triple for red), only the colour word differs
    hues = {}
    for colour in ("red", "blue"):
        video = _generate(pipe, f"a {colour} triangle moves left quickly on a black background.", seed=7)[0]
        hues[colour] = check_video(video, colour=colour)
    assert hues["red"]["colour_ok"] and hues["blue"]["colour_ok"], hues


def test_silhouette_statistics_order_the_rendered_shapes():
    """The shape statistics on the training renderer's own shapes (no model): the orderings the shape test
    asserts hold with a wide margin at the small, medium and large sizes, and only the ring has a hole."""
    pytest.importorskip("skimage", reason="the renderer loads scikit-image's sample photographs")
    from sagevideo.recipes.tiny_wan.data import BACKGROUNDS, COLOURS, SHAPES, ObjectSpec, Renderer, Scene
    from sagevideo.recipes.tiny_wan.evaluate import shape_contrasts, silhouette

    renderer = Renderer("cpu", photo_size=32)
    black = BACKGROUNDS["black"]
    for radius in (0.065, 0.095, 0.14):
        scenes = [Scene(caption="", background="solid", bg_a=black, bg_b=black,
                        objects=[ObjectSpec(shape, "blue", COLOURS["blue"], "left", "quickly", "", radius,
                                            (0.1, 0.05), (-0.014, 0.0))])
                  for shape in SHAPES]
        video = renderer.render(scenes, FRAMES, HEIGHT, WIDTH)
        by_shape = {shape: silhouette(((v + 1) / 2).permute(1, 2, 3, 0).numpy())
                    for shape, v in zip(SHAPES, video)}
        contrasts = shape_contrasts(by_shape)
        assert len(contrasts) == 6 and all(c["margin"] > 0.1 for c in contrasts), (radius, contrasts)
        assert by_shape["square"]["fill"] > 0.95 and abs(by_shape["circle"]["fill"] - 0.785) < 0.03, (radius, by_shape)
        assert by_shape["ring"]["hole"] > 0.2, by_shape
        assert all(by_shape[s]["hole"] < 0.02 for s in SHAPES if s != "ring"), by_shape


def test_changing_only_the_shape_word_changes_the_silhouette(pipe, heldout_videos):
    from sagevideo.recipes.tiny_wan.data import heldout_prompt
    from sagevideo.recipes.tiny_wan.evaluate import SHAPE_ORDERINGS, shape_contrasts, silhouette

    trio = ("square", "circle", "triangle")
    contrasts, detail = [], []
    for seed, (p, video) in enumerate(heldout_videos):  # the fixture generated prompt i with seed i
        others = [s for s in trio if s != p["shape"]] if p["shape"] in trio else ["circle"]
        by_shape = {p["shape"]: silhouette(video)}
        for shape in others:  # same seed, colour, direction and background: only the shape word differs
            prompt = heldout_prompt(p["colour"], shape, p["direction"])
            by_shape[shape] = silhouette(_generate(pipe, prompt, seed=seed)[0])
        group = shape_contrasts(by_shape)
        contrasts += group
        stats = ", ".join(f"{s}{'*' if s == p['shape'] else ''} fill {v['fill']:.3f} bottom {v['bottom_heavy']:+.3f}"
                          for s, v in by_shape.items())
        orderings = ", ".join(f"{c['statistic']} {c['larger']}>{c['smaller']} {c['margin']:+.3f}"
                              + ("" if c["ok"] else " FAILS") for c in group)
        detail.append(f"{p['colour']}/{p['direction']}, seed {seed} (* the held-out triple): {stats} | {orderings}")
    report = "\n".join(detail)
    assert len(contrasts) == 26, report
    passed = sum(c["ok"] for c in contrasts)
    assert passed >= MIN_SHAPE_ORDERINGS, f"{passed}/{len(contrasts)} orderings hold:\n{report}"
    # and the differences are not marginal: the mean margin of each ordering checked in all six trio groups
    for stat, hi, lo in SHAPE_ORDERINGS:
        margins = [c["margin"] for c in contrasts if (c["statistic"], c["larger"], c["smaller"]) == (stat, hi, lo)]
        if len(margins) > 1:
            assert np.mean(margins) >= MIN_MEAN_SHAPE_MARGIN, (
                f"{stat} {hi}>{lo}: mean of {np.round(margins, 3).tolist()}\n{report}")


# The shipped VAE (2026-11-24) was trained on 9-frame clips and its decoder fine-tuned on 17-frame ones. On the
# held-out prompts' correct answers at 33x128x128 (CPU) its round trip keeps the hue within 10 degrees over frames
# 0-16 (8/8 nearest the stated colour) but not over frames 21-32 (1/8; errors up to 110 degrees). Encoder and
# decoder both drift there (RESULTS, eighteenth session). The recipe now trains both on 33-frame clips too; this
# marker comes off with the first model trained that way that passes.
@pytest.mark.xfail(strict=True, reason="known limit of the 2026-11-24 model: colour drifts late in 33-frame clips")
def test_vae_keeps_colours_to_the_end_of_a_default_length_clip(pipe):
    """Correct answers to the held-out prompts, 33 frames (the default length) at 128x128, encoded and decoded by
    the bundled VAE: the objects' hue over the last 12 frames stays within reach of the rendered one (what the
    pipeline can show at best at the default length)."""
    from sagevideo.recipes.tiny_wan import data as D
    from sagevideo.recipes.tiny_wan import evaluate as E

    frames, size = 33, 128
    renderer = D.Renderer(torch.device("cpu"), photo_size=256)
    video = renderer.render(D.heldout_scenes(frames, size, size, 0), frames, size, size)
    with torch.no_grad():
        rec = torch.cat([pipe.vae.decode(pipe.vae.encode(video[i:i + 2]).latent_dist.mode()).sample
                         for i in range(0, len(video), 2)])
    prompts = D.heldout_prompts()
    early = [E.check_video(E._frames(v)[:17], p["colour"]) for v, p in zip(rec, prompts)]
    late = [E.check_video(E._frames(v)[21:], p["colour"]) for v, p in zip(rec, prompts)]
    detail = [(p["colour"], round(a["hue_error"]), round(b["hue_error"])) for p, a, b in zip(prompts, early, late)]
    # the early frames are the control: a round trip that loses colour everywhere is another failure
    assert sum(r["colour_ok"] for r in early) >= 7, detail
    assert sum(r["colour_ok"] for r in late) >= 7 and np.mean([r["hue_error"] for r in late]) < 15.0, detail

"""The tiny text-to-video model bundled in ``assets/tiny-wan``.

A Wan-architecture pipeline (diffusers ``WanTransformer3DModel`` + ``AutoencoderKLWan``, a small
``UMT5EncoderModel`` and a Unigram tokenizer built with the ``tokenizers`` library) trained from scratch on
procedurally generated captioned clips (:mod:`.data`). Small enough to run on a laptop CPU, large enough
(2,304 video tokens at the default 33x256x256) that its attention has real spatial and temporal structure.

Modules:

* :mod:`.data`     - the clip generator (vectorised torch, runs on the GPU), captions, held-out split;
* :mod:`.model`    - configurations, the tokenizer, prompt encoding and pipeline assembly;
* :mod:`.train`    - the two-stage training script (VAE, then text encoder + transformer) with time
  budgets and resumable checkpoints;
* :mod:`.evaluate` - VAE reconstruction PSNR and the colour / motion checks on generated videos;
* :mod:`.assemble` - turns a training output folder into the ``assets/tiny-wan`` pipeline + model card.
"""

ASSET_NAME = "tiny-wan"

# Default generation size: 33 frames at 256x256 -> latent 9x32x32 -> 9x16x16 = 2,304 video tokens.
DEFAULT_FRAMES = 33
DEFAULT_HEIGHT = 256
DEFAULT_WIDTH = 256
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 5.0
DEFAULT_FPS = 16


def asset_path():
    """Where the bundled pipeline folder lives: ``$SAGEVIDEO_TINY_WAN_PATH`` if set, else
    ``assets/tiny-wan`` at the top of the source tree (next to the ``sagevideo`` package)."""
    import os
    from pathlib import Path

    env = os.environ.get("SAGEVIDEO_TINY_WAN_PATH")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "assets" / ASSET_NAME


def dtype_kwarg(dtype) -> dict:
    """``from_pretrained`` dtype keyword: ``dtype`` from diffusers 0.42 on (``torch_dtype`` is deprecated
    there), ``torch_dtype`` before."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def load_pipeline(path=None, device="cpu", dtype=None):
    """``WanPipeline`` of the bundled model, offline, every component in eval mode (fp32 by default).

    Raises ``FileNotFoundError`` with the training instructions if the folder has not been built.
    """
    import torch
    from diffusers import WanPipeline

    path = asset_path() if path is None else path
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"{path} holds no trained pipeline: train it with `python -m sagevideo.recipes.tiny_wan.train` "
            f"(GPU) and build it with `python -m sagevideo.recipes.tiny_wan.assemble`"
        )
    pipe = WanPipeline.from_pretrained(str(path), local_files_only=True, **dtype_kwarg(dtype or torch.float32))
    for name in ("vae", "text_encoder", "transformer"):
        getattr(pipe, name).eval()
    return pipe.to(device)

"""Whole-clip passes through diffusers' ``AutoencoderKLWan``, for training.

``AutoencoderKLWan.encode`` runs its encoder over a clip in causal chunks (the first frame, then 4 frames at a
time) and ``decode`` over one latent frame at a time, carrying each causal convolution's last two input frames
from one chunk to the next. That bounds memory at inference, but at training sizes the chunk loop is mostly
copies: the caches are cloned and concatenated around every convolution, and a probe of the encode of
64 x 33x256x256 on an H100 found the convolutions themselves at 21 % of its GPU time.

Because every convolution is causal in time, a pass over the whole clip at once computes the same thing, with
two exceptions that the chunking introduces and that are reproduced here:

* a temporal downsampler (``downsample3d``) passes its first frame through and applies its stride-2 time
  convolution, unpadded, over the whole sequence: ``cat(x[:, :, :1], time_conv(x))``;
* a temporal upsampler (``upsample3d``) passes its first frame through un-doubled and applies its causal time
  convolution to the frames after it only (the first chunk's cache is zeros, not that frame).

:func:`encode` and :func:`decode` here are therefore the pipeline's encode and decode up to floating-point
rounding (``tests/test_tiny_wan_recipe.py`` compares them on random weights), with the same modules and
weights, so what the recipe trains is what ``WanPipeline`` runs. Wan 2.2's residual VAE blocks and the
patchified VAE are not covered (the tiny model uses neither).

Measured on an H100 (bf16 autocast, 2026-11-24, RESULTS "Sixteenth session"): encoding 64 x 33x256x256 takes
472 ms against 569 chunked, a VAE training step (32 x 9x128x128) 158 ms against 230, a decoder fine-tune step
(8 x 17x256x256) 224 ms against 320. What is left is cuDNN's small-channel 3-D convolutions, their layout
transposes and the norms; ``torch.compile`` of the whole pass measured no faster.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

# clips per whole-clip encode of a transformer batch: the peak at 64 x 33x256x256 (bf16) falls from 40 to 12 GiB
# at the same speed (H100; the chunked pipeline encode peaks at 10)
ENCODE_MAX_BATCH = 16


def _check(vae) -> None:
    if vae.config.is_residual or vae.config.patch_size is not None:
        raise NotImplementedError("whole-clip passes cover the Wan 2.1 VAE (is_residual=False, patch_size=None)")


def _resample(layer: WanResample, x: torch.Tensor) -> torch.Tensor:
    """One ``WanResample`` over a whole clip, as the chunked pass computes it."""
    if layer.mode == "upsample3d" and x.shape[2] > 1:
        b, c, t, h, w = x.shape
        rest = layer.time_conv(x[:, :, 1:])  # (b, 2c, t-1, h, w): causal, zero history
        rest = rest.reshape(b, 2, c, t - 1, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * (t - 1), h, w)
        x = torch.cat([x[:, :, :1], rest], dim=2)
    x = layer(x)  # without a feature cache the module applies its per-frame spatial part only
    if layer.mode == "downsample3d" and x.shape[2] > 1:
        x = torch.cat([x[:, :, :1], layer.time_conv(x)], dim=2)
    return x


def _run(layers, x: torch.Tensor) -> torch.Tensor:
    # without a feature cache, residual blocks pad each causal convolution with zeros: the whole-clip form
    for layer in layers:
        x = _resample(layer, x) if isinstance(layer, WanResample) else layer(x)
    return x


def encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """The encoder's output after ``quant_conv`` (mean and log-variance stacked on channels), as
    ``vae._encode(x)`` returns it, for ``x`` of shape (B, 3, 1 + 4k, H, W) in [-1, 1]."""
    _check(vae)
    if x.ndim != 5 or (x.shape[2] - 1) % 4:
        raise ValueError(f"expected frames (B, C, 1 + 4k, H, W), got {tuple(x.shape)}")
    enc = vae.encoder
    h = enc.mid_block(_run(enc.down_blocks, enc.conv_in(x)))
    h = enc.conv_out(enc.nonlinearity(enc.norm_out(h)))
    return vae.quant_conv(h)


def encode(vae, x: torch.Tensor, max_batch: int | None = None) -> DiagonalGaussianDistribution:
    """``vae.encode(x).latent_dist`` by a whole-clip pass; ``max_batch`` splits the batch to bound memory."""
    if max_batch and x.shape[0] > max_batch:
        moments = torch.cat([encode_moments(vae, part) for part in x.split(max_batch)])
    else:
        moments = encode_moments(vae, x)
    return DiagonalGaussianDistribution(moments)


def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` by a whole-clip pass: frames in [-1, 1], (B, 3, 1 + 4(T - 1), H, W)."""
    _check(vae)
    if z.ndim != 5:
        raise ValueError(f"expected latents (B, C, T, H, W), got {tuple(z.shape)}")
    dec = vae.decoder
    h = dec.mid_block(dec.conv_in(vae.post_quant_conv(z)))
    for block in dec.up_blocks:
        h = _run(block.resnets, h)
        if block.upsamplers is not None:
            h = _resample(block.upsamplers[0], h)
    h = dec.conv_out(dec.nonlinearity(dec.norm_out(h)))
    return h.clamp(-1.0, 1.0)

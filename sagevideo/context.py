"""What one attention call knows about itself: step, layer, token layout, mask.

:class:`TokenLayout` is filled by the model family's file in ``pipelines/`` from the transformer's inputs (the
latent shape and patch size give the video grid; the text encoder output gives the text length) and describes
the joint self-attention sequence, whose queries and keys are the same tokens:

* Wan: video tokens only (text is in cross-attention, which sagevideo leaves alone);
* HunyuanVideo / HunyuanVideo 1.5: video tokens first, then text (with a key-padding mask);
* CogVideoX: text first (226 tokens by default), then video.

Video tokens are frame-major, ``(frames, height, width)`` after patching, in all families.

:class:`AttentionContext` is what a method (``sagevideo.methods``) receives with ``q, k, v``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

__all__ = ["TokenLayout", "AttentionContext", "RingChunk"]


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the video and text tokens of a self-attention sequence are.

    Attributes:
        family: model family name (``"wan"``, ``"hunyuan_video"``, ...), or ``""`` when unknown.
        grid: post-patch video grid ``(frames, height, width)``; None when unknown.
        video_start: index of the first video token in the sequence.
        text_start: index of the first text token (None when the sequence has no text).
        text_len: number of text token slots (padding included; the key-padding mask says which are real).
    """

    family: str = ""
    grid: tuple[int, int, int] | None = None
    video_start: int = 0
    text_start: int | None = None
    text_len: int = 0

    def __post_init__(self):
        if self.grid is not None:
            if len(self.grid) != 3 or any(int(g) <= 0 for g in self.grid):
                raise ValueError(f"TokenLayout.grid must be three positive ints (frames, height, width), got {self.grid}")
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        if (self.text_start is None) != (self.text_len == 0):
            raise ValueError("TokenLayout: text_start and text_len must be given together")

    @property
    def video_len(self) -> int:
        """Number of video tokens (0 when the grid is unknown)."""
        if self.grid is None:
            return 0
        f, h, w = self.grid
        return f * h * w

    @property
    def seq_len(self) -> int:
        return self.video_len + self.text_len

    @property
    def video_slice(self) -> slice:
        return slice(self.video_start, self.video_start + self.video_len)

    @property
    def text_slice(self) -> slice | None:
        return None if self.text_start is None else slice(self.text_start, self.text_start + self.text_len)


UNKNOWN_LAYOUT = TokenLayout()


@dataclasses.dataclass(frozen=True)
class RingChunk:
    """Under ring context parallelism a call sees the local queries and one rank's key/value chunk.

    ``rank``/``world`` are the ring coordinates of this process; ``kv_rank`` is whose keys this call sees, so
    a method that needs global key positions can compute them (the sequence is split evenly).
    """

    rank: int
    world: int
    kv_rank: int


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """Everything an attention method may use besides q, k, v.

    Attributes:
        step: denoising step index (0-based), or None when unknown.
        num_steps: number of denoising steps, or None when unknown.
        layer: index of this self-attention module in the transformer (0-based).
        num_layers: number of patched self-attention modules in the transformer.
        layout: the family's :class:`TokenLayout` for this forward.
        tensor_layout: ``"BSHD"`` or ``"BHSD"`` (layout of q, k, v and of the expected output).
        heads: global indices of the heads present in q (Ulysses parallelism and per-head rules give subsets).
        scale: softmax scale, or None for ``1/sqrt(head_dim)``.
        key_padding_mask: bool ``(B, S_kv)``, True = attend, or None.
        return_lse: whether the method must also return the log-sum-exp.
        params: the chosen rule's parameters, defaults filled in.
        ring: set under ring context parallelism (see :class:`RingChunk`).
        store: a dict owned by whoever runs the schedule (one per patched transformer or ComfyUI override)
            where stateful methods keep what they reuse across steps, under keys they choose (the sparse
            methods use ``(method, layer, heads)``: k-means centroids, head classes). None = stateless call.
    """

    step: int | None
    num_steps: int | None
    layer: int
    num_layers: int
    layout: TokenLayout
    tensor_layout: str
    heads: tuple[int, ...]
    scale: float | None = None
    key_padding_mask: torch.Tensor | None = None
    return_lse: bool = False
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    ring: RingChunk | None = None
    store: MutableMapping[Any, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def step_fraction(self) -> float | None:
        """``step / num_steps`` in [0, 1): how far along the denoising trajectory this call is."""
        if self.step is None or not self.num_steps:
            return None
        return self.step / self.num_steps

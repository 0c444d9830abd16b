"""Procedurally generated captioned video clips for training the tiny Wan model.

A clip is a background (solid colour, two-colour gradient, or one of the photographs that scikit-image
ships, seen through a camera that can pan or zoom), zero to three coloured shapes that move in a stated
direction at a stated speed, and an optional lighting change. Its caption is templated English that
states all of that, e.g. ``"a small red circle moves left slowly and a blue star moves up quickly on a
vertical gradient from black to white. the light gets darker."``

Two halves, so that the data stream is deterministic and the rendering is fast:

* :class:`SceneSampler` draws the discrete description of each clip with a :class:`random.Random`
  seeded from ``(seed, stream, step)``; it is plain Python and costs microseconds per clip, and since the
  generator is derived from the step number the stream is identical after resuming from a checkpoint.
* :class:`Renderer` turns a batch of scenes into pixels with vectorised torch (signed-distance shapes,
  ``grid_sample`` over the photo bank for camera motion) on whatever device it was built for - the GPU
  during training, so data generation does not starve the model.

Geometry: positions are in units of ``min(height, width)`` with the origin at the frame centre, ``x`` to
the right and ``y`` *down* (image convention: "up" is negative ``y``). Speeds are in those units per frame,
so a 128x128 clip is a down-scaled 256x256 clip and a 17-frame clip is the first half of a 33-frame one.

Held-out split: the (colour, shape, direction) triples in :data:`HELD_OUT` never occur in training
(every colour, shape and direction does, in other combinations); tests and the model card prompt the
model with them (:func:`heldout_prompts`).
"""

from __future__ import annotations

import colorsys
import hashlib
import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------------

#: Object colours (chromatic only, hues spread round the circle so "dominant hue" identifies them).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.08),
    "orange": (1.00, 0.52, 0.04),
    "yellow": (0.96, 0.88, 0.08),
    "green": (0.10, 0.72, 0.18),
    "cyan": (0.08, 0.80, 0.88),
    "blue": (0.10, 0.26, 0.95),
    "purple": (0.56, 0.16, 0.86),
    "pink": (1.00, 0.42, 0.72),
}

#: Background colours (solid backgrounds and gradient end points). The "dark" ones exclude the object
#: colour they are named after, so a caption never asks for a blue star on a dark blue background.
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.03, 0.03, 0.03),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "dark blue": (0.04, 0.07, 0.30),
    "dark green": (0.03, 0.22, 0.07),
    "dark red": (0.30, 0.04, 0.04),
    "dark purple": (0.18, 0.05, 0.26),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "ring")

#: Unit direction vectors (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
    "up-left": (-math.sqrt(0.5), -math.sqrt(0.5)),
    "up-right": (math.sqrt(0.5), -math.sqrt(0.5)),
    "down-left": (-math.sqrt(0.5), math.sqrt(0.5)),
    "down-right": (math.sqrt(0.5), math.sqrt(0.5)),
}
_DIRECTION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("left", "to the left"),
    "right": ("right", "to the right"),
    "up": ("up", "upward"),
    "down": ("down", "downward"),
    "up-left": ("up and to the left", "toward the top left"),
    "up-right": ("up and to the right", "toward the top right"),
    "down-left": ("down and to the left", "toward the bottom left"),
    "down-right": ("down and to the right", "toward the bottom right"),
}

#: Speeds in frame units per frame: over 33 frames "slowly" covers ~0.2 of the frame, "quickly" ~0.45.
SPEEDS: dict[str, float] = {"slowly": 0.0065, "quickly": 0.014}
_SPEED_PHRASES: dict[str, tuple[str, ...]] = {"slowly": ("slowly",), "quickly": ("quickly", "fast")}

#: Object radius ranges in frame units; the medium size is not named in captions.
SIZES: dict[str, tuple[float, float]] = {"small": (0.055, 0.075), "": (0.085, 0.11), "large": (0.12, 0.15)}

#: scikit-image sample photographs used as backgrounds (all load offline from the package itself) and
#: the noun phrase captions use for them. Licences are listed in the model card.
PHOTOS: dict[str, str] = {
    "astronaut": "an astronaut",
    "coffee": "a cup of coffee",
    "chelsea": "a cat",
    "rocket": "a rocket launch",
    "camera": "a man with a camera",
    "coins": "old coins",
    "brick": "a brick wall",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "distant galaxies",
}

CAMERA_MOTIONS: tuple[str, ...] = ("static", "pan left", "pan right", "pan up", "pan down", "zoom in", "zoom out")
LIGHTING: tuple[str, ...] = ("none", "brighter", "darker")
_LIGHTING_PHRASES = {
    "brighter": ("the light gets brighter", "the scene slowly brightens"),
    "darker": ("the light gets darker", "the scene fades darker"),
}
_MOVE_VERBS = ("moves", "slides", "drifts", "glides", "travels")
_STILL_PHRASES = ("stays still", "does not move", "sits still")

#: (colour, shape, direction) triples never shown in training; each colour, shape and direction does
#: occur in other combinations. Cardinal directions only, two per colour, two per direction.
HELD_OUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "left"),
    ("red", "square", "down"),
    ("green", "circle", "right"),
    ("green", "diamond", "up"),
    ("blue", "square", "up"),
    ("blue", "star", "left"),
    ("yellow", "circle", "down"),
    ("yellow", "triangle", "right"),
)
_HELD_OUT_SET = frozenset(HELD_OUT)

SHAPE_INDEX = {name: i for i, name in enumerate(SHAPES)}
PHOTO_NAMES: tuple[str, ...] = tuple(PHOTOS)
MAX_OBJECTS = 3

_AVAILABLE_PHOTOS: tuple[str, ...] | None = None


def _read_photo(name: str):
    import numpy as np
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3]


def available_photos() -> tuple[str, ...]:
    """The :data:`PHOTOS` this scikit-image installation can load without a download (all of them on
    scikit-image 0.26). Empty without scikit-image."""
    global _AVAILABLE_PHOTOS
    if _AVAILABLE_PHOTOS is None:
        ok = []
        for name in PHOTO_NAMES:
            try:
                _read_photo(name)
                ok.append(name)
            except Exception:  # noqa: BLE001 - a missing optional data file
                pass
        _AVAILABLE_PHOTOS = tuple(ok)
    return _AVAILABLE_PHOTOS


def colour_hue(name: str) -> float:
    """Hue in degrees [0, 360) of a named object colour."""
    r, g, b = COLOURS[name]
    return colorsys.rgb_to_hsv(r, g, b)[0] * 360.0


def heldout_prompt(colour: str, shape: str, direction: str, speed: str = "quickly",
                   background: str = "black") -> str:
    """The caption template the tests use: one object on a solid background."""
    return f"a {colour} {shape} moves {_DIRECTION_PHRASES[direction][0]} {speed} on a {background} background."


def heldout_prompts() -> list[dict]:
    """One prompt per held-out triple, with what a correct video shows."""
    return [
        {"prompt": heldout_prompt(c, s, d), "colour": c, "shape": s, "direction": d}
        for c, s, d in HELD_OUT
    ]


def heldout_scenes(frames: int, height: int, width: int, seed: int = 0) -> list["Scene"]:
    """What a correct generation of each :func:`heldout_prompts` prompt shows: the object (medium size, the
    palette colour) moving "quickly" the stated way on the black background, its path inside the frame (start
    drawn from ``random.Random(seed)``). The reference for the evaluation's checks: rendered, and through the
    VAE (:func:`evaluate.heldout_reference`), they show what a perfect transformer could score."""
    rng = random.Random(seed)
    aspect = width / height
    half = (0.5 * max(aspect, 1.0), 0.5 * max(1.0 / aspect, 1.0))
    scenes = []
    for p in heldout_prompts():
        radius = rng.uniform(*SIZES[""])
        ux, uy = DIRECTIONS[p["direction"]]
        v = SPEEDS["quickly"]
        vel = (ux * v, uy * v)
        pos = []
        for d, h in zip((vel[0] * (frames - 1), vel[1] * (frames - 1)), half):
            lo, hi = -h + radius * 1.05, h - radius * 1.05
            a, b = (lo, hi - d) if d >= 0 else (lo - d, hi)
            pos.append(rng.uniform(a, b) if a < b else 0.5 * (lo + hi) - 0.5 * d)
        obj = ObjectSpec(p["shape"], p["colour"], COLOURS[p["colour"]], p["direction"], "quickly", "", radius,
                         (pos[0], pos[1]), vel)
        black = BACKGROUNDS["black"]
        scenes.append(Scene(caption=p["prompt"], background="solid", bg_a=black, bg_b=black, objects=[obj]))
    return scenes


# ----------------------------------------------------------------------------------------------------
# Scene description (pure Python, deterministic)
# ----------------------------------------------------------------------------------------------------


@dataclass
class ObjectSpec:
    shape: str
    colour: str
    rgb: tuple[float, float, float]
    direction: str  # a key of DIRECTIONS, or "still"
    speed: str  # a key of SPEEDS ("" when still)
    size: str  # a key of SIZES
    radius: float
    pos0: tuple[float, float]
    vel: tuple[float, float]


@dataclass
class Scene:
    caption: str
    background: str  # "solid" | "gradient" | "photo"
    bg_a: tuple[float, float, float] = (0.0, 0.0, 0.0)
    bg_b: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gradient: str = "vertical"
    photo: str = ""
    camera: str = "static"
    cam_c0: tuple[float, float] = (0.0, 0.0)
    cam_c1: tuple[float, float] = (0.0, 0.0)
    cam_h0: float = 1.0
    cam_h1: float = 1.0
    lighting: str = "none"
    objects: list[ObjectSpec] = field(default_factory=list)


def stream_rng(seed: int, stream: str, step: int) -> random.Random:
    """A Python RNG that depends only on (seed, stream, step): the data stream survives resuming."""
    digest = hashlib.sha256(f"tiny-wan/{seed}/{stream}/{step}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def stream_generator(seed: int, stream: str, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator (on ``device``) that depends only on (seed, stream, step)."""
    digest = hashlib.sha256(f"tiny-wan-torch/{seed}/{stream}/{step}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:7], "little"))
    return g


#: Default shares of (solid, gradient, photo) backgrounds in a data stream.
BACKGROUND_WEIGHTS = (0.4, 0.2, 0.4)


class SceneSampler:
    """Draws scenes and their captions.

    ``split="train"`` rejects the held-out (colour, shape, direction) triples; ``split="eval"`` draws from
    the full distribution (it is used with its own seed stream for held-out reconstruction clips).
    """

    def __init__(self, split: str = "train", backgrounds: tuple[float, float, float] = BACKGROUND_WEIGHTS):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if len(backgrounds) != 3 or min(backgrounds) < 0 or sum(backgrounds) <= 0:
            raise ValueError(f"backgrounds must be three non-negative weights (solid, gradient, photo), got {backgrounds}")
        self.split = split
        total = float(sum(backgrounds))
        self.solid_below = backgrounds[0] / total
        self.gradient_below = (backgrounds[0] + backgrounds[1]) / total

    # -- objects --------------------------------------------------------------------------------------
    def _object(self, rng: random.Random, frames: int, aspect: float, avoid: set[str]) -> ObjectSpec:
        while True:
            colour = rng.choice([c for c in COLOURS if c not in avoid])
            shape = rng.choice(SHAPES)
            direction = rng.choice(list(DIRECTIONS)) if rng.random() > 0.1 else "still"
            if self.split == "train" and (colour, shape, direction) in _HELD_OUT_SET:
                continue
            break
        size = rng.choices(list(SIZES), weights=(0.3, 0.45, 0.25))[0]
        lo, hi = SIZES[size]
        radius = rng.uniform(lo, hi)
        rgb = tuple(min(1.0, max(0.0, v * rng.uniform(0.88, 1.04) + rng.uniform(-0.03, 0.03)))
                    for v in COLOURS[colour])
        half_w, half_h = 0.5 * max(aspect, 1.0), 0.5 * max(1.0 / aspect, 1.0)
        margin = radius * 1.05
        if direction == "still":
            speed = ""
            vel = (0.0, 0.0)
            span = (0.0, 0.0)
        else:
            speed = rng.choice(list(SPEEDS))
            ux, uy = DIRECTIONS[direction]
            v = SPEEDS[speed] * rng.uniform(0.85, 1.15)
            vel = (ux * v, uy * v)
            span = (vel[0] * (frames - 1), vel[1] * (frames - 1))
        # start so that the whole path stays inside the frame (shrinking the path if it cannot)
        pos = []
        for d, half in zip(span, (half_w, half_h)):
            lo_p, hi_p = -half + margin, half - margin
            if d >= 0:
                a, b = lo_p, hi_p - d
            else:
                a, b = lo_p - d, hi_p
            pos.append(rng.uniform(a, b) if a < b else 0.5 * (lo_p + hi_p) - 0.5 * d)
        return ObjectSpec(shape, colour, rgb, direction, speed, size, radius, (pos[0], pos[1]), vel)

    @staticmethod
    def _object_phrase(rng: random.Random, o: ObjectSpec) -> str:
        noun = f"{o.size} {o.colour} {o.shape}".strip() if o.size else f"{o.colour} {o.shape}"
        if o.direction == "still":
            return f"a {noun} {rng.choice(_STILL_PHRASES)}"
        verb = rng.choice(_MOVE_VERBS)
        where = rng.choice(_DIRECTION_PHRASES[o.direction])
        how = rng.choice(_SPEED_PHRASES[o.speed])
        if rng.random() < 0.5:
            return f"a {noun} {verb} {where} {how}"
        return f"a {noun} {verb} {how} {where}"

    # -- scenes ---------------------------------------------------------------------------------------
    def sample(self, rng: random.Random, frames: int, height: int, width: int) -> Scene:
        aspect = width / height
        u = rng.random()
        background = "solid" if u < self.solid_below else ("gradient" if u < self.gradient_below else "photo")
        scene = Scene(caption="", background=background)
        avoid: set[str] = set()
        if background == "solid":
            name = rng.choice(list(BACKGROUNDS))
            scene.bg_a = scene.bg_b = BACKGROUNDS[name]
            bg_text = rng.choice((f"on a {name} background", f"against a {name} background"))
            avoid = {name.split()[-1]} if name.startswith("dark") else set()
        elif background == "gradient":
            a, b = rng.sample(list(BACKGROUNDS), 2)
            scene.bg_a, scene.bg_b = BACKGROUNDS[a], BACKGROUNDS[b]
            scene.gradient = rng.choice(("vertical", "horizontal"))
            bg_text = f"on a {scene.gradient} gradient from {a} to {b}"
            avoid = {n.split()[-1] for n in (a, b) if n.startswith("dark")}
        else:
            scene.photo = rng.choice(PHOTO_NAMES)
            scene.camera = rng.choices(CAMERA_MOTIONS, weights=(2, 1, 1, 1, 1, 1, 1))[0]
            self._camera_path(rng, scene)
            bg_text = ""

        if background == "photo":
            n_obj = rng.choices((0, 1, 2), weights=(0.35, 0.45, 0.2))[0]
        else:
            n_obj = rng.choices((1, 2, 3), weights=(0.55, 0.3, 0.15))[0]
        for _ in range(n_obj):
            scene.objects.append(self._object(rng, frames, aspect, avoid))
        scene.lighting = rng.choices(LIGHTING, weights=(0.7, 0.15, 0.15))[0]
        scene.caption = self._caption(rng, scene, bg_text)
        return scene

    @staticmethod
    def _camera_path(rng: random.Random, scene: Scene) -> None:
        # window half-size h (the photo spans [-1, 1]) and centre c, interpolated over the clip
        cam = scene.camera
        if cam == "static":
            h = rng.uniform(0.55, 0.95)
            m = 1.0 - h
            c = (rng.uniform(-m, m), rng.uniform(-m, m))
            scene.cam_h0 = scene.cam_h1 = h
            scene.cam_c0 = scene.cam_c1 = c
        elif cam.startswith("pan"):
            h = rng.uniform(0.5, 0.65)
            m = 1.0 - h
            travel = rng.uniform(0.6, 1.0) * m
            other = rng.uniform(-m, m)
            sign = {"left": -1.0, "right": 1.0, "up": -1.0, "down": 1.0}[cam.split()[1]]
            if cam in ("pan left", "pan right"):
                scene.cam_c0, scene.cam_c1 = (-sign * travel, other), (sign * travel, other)
            else:
                scene.cam_c0, scene.cam_c1 = (other, -sign * travel), (other, sign * travel)
            scene.cam_h0 = scene.cam_h1 = h
        else:
            wide, tight = rng.uniform(0.85, 0.98), rng.uniform(0.4, 0.55)
            m = 1.0 - wide
            c = (rng.uniform(-m, m), rng.uniform(-m, m))
            scene.cam_c0 = scene.cam_c1 = c
            scene.cam_h0, scene.cam_h1 = (wide, tight) if cam == "zoom in" else (tight, wide)

    def _caption(self, rng: random.Random, scene: Scene, bg_text: str) -> str:
        phrases = [self._object_phrase(rng, o) for o in scene.objects]
        if len(phrases) <= 1:
            objects = "".join(phrases)
        else:
            objects = ", ".join(phrases[:-1]) + " and " + phrases[-1]
        if scene.background == "photo":
            noun = PHOTOS[scene.photo]
            cam = scene.camera
            if not objects:
                if cam == "static":
                    text = rng.choice((f"a still photo of {noun}", f"a photo of {noun}, the camera holds still"))
                elif cam.startswith("pan"):
                    text = f"the camera pans {cam.split()[1]} across a photo of {noun}"
                else:
                    text = f"the camera zooms {cam.split()[1]} on a photo of {noun}"
            else:
                text = f"{objects} over a photo of {noun}"
                if cam.startswith("pan"):
                    text += f", while the camera pans {cam.split()[1]}"
                elif cam.startswith("zoom"):
                    text += f", while the camera zooms {cam.split()[1]}"
        else:
            text = f"{objects} {bg_text}"
        text += "."
        if scene.lighting != "none":
            text += " " + rng.choice(_LIGHTING_PHRASES[scene.lighting]) + "."
        return text

    def batch(self, seed: int, stream: str, step: int, size: int, frames: int, height: int, width: int) -> list[Scene]:
        rng = stream_rng(seed, stream, step)
        return [self.sample(rng, frames, height, width) for _ in range(size)]


def caption_corpus(n: int = 20000, seed: int = 1234) -> list[str]:
    """Captions for training the tokenizer: a fixed sample of the caption distribution plus every word
    of the vocabulary and the held-out prompts (their words all occur in training captions anyway)."""
    sampler = SceneSampler("eval")
    rng = random.Random(seed)
    out = [sampler.sample(rng, 33, 256, 256).caption for _ in range(n)]
    words = set(COLOURS) | set(BACKGROUNDS) | set(SHAPES) | set(SPEEDS) | set(SIZES) - {""}
    for phrases in (_DIRECTION_PHRASES, _SPEED_PHRASES, _LIGHTING_PHRASES):
        for v in phrases.values():
            words.update(v)
    words.update(PHOTOS.values())
    out.extend(sorted(w for w in words if w))
    out.extend(p["prompt"] for p in heldout_prompts())
    return out


# ----------------------------------------------------------------------------------------------------
# Rendering (vectorised torch)
# ----------------------------------------------------------------------------------------------------


def _load_photo_bank(size: int) -> torch.Tensor:
    """All :data:`PHOTOS` as a float tensor [N, 3, size, size] in [0, 1] (centre crop, area resize).
    Rendering needs scikit-image (``pip install -e ".[train]"``); the scene and caption stream does not,
    so the tokenizer and the captions are the same with or without it."""
    import numpy as np

    bank = torch.zeros(len(PHOTO_NAMES), 3, size, size)
    for i, name in enumerate(PHOTO_NAMES):
        if name not in available_photos():
            raise RuntimeError(f"scikit-image cannot load the sample photograph {name!r}; install the "
                               "training extra: pip install -e '.[train]'")
        img = _read_photo(name)
        h, w = img.shape[:2]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        img = img[top : top + s, left : left + s]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div(255.0)[None]
        t = F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        bank[i] = t.clamp(0, 1)[0]
    return bank


def _shape_distance(shape: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (negative inside), in units of the object radius, of the unit shape
    at the origin. ``x``/``y`` broadcast; ``y`` points down."""
    if shape == SHAPE_INDEX["circle"]:
        return torch.sqrt(x * x + y * y) - 1.0
    if shape == SHAPE_INDEX["square"]:
        return torch.maximum(x.abs(), y.abs()) - 0.85
    if shape == SHAPE_INDEX["diamond"]:
        return (x.abs() + y.abs() - 1.2) * math.sqrt(0.5)
    if shape == SHAPE_INDEX["triangle"]:
        # equilateral, apex up, circumradius 1.25 (inradius 0.625): max over the three edge half-planes
        c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
        return torch.maximum(torch.maximum(y, c * x - s * y), -c * x - s * y) - 0.625
    if shape == SHAPE_INDEX["star"]:
        r = torch.sqrt(x * x + y * y)
        theta = torch.atan2(x, -y)  # 0 at the top, so one point faces up
        tri = torch.abs(torch.remainder(theta * (5.0 / (2.0 * math.pi)) + 0.5, 1.0) - 0.5) * 2.0  # 0 at tips
        edge = 1.25 - 0.8 * tri
        return (r - edge) * 0.55
    if shape == SHAPE_INDEX["ring"]:
        return torch.abs(torch.sqrt(x * x + y * y) - 0.78) - 0.24
    raise ValueError(f"unknown shape index {shape}")


class Renderer:
    """Renders batches of :class:`Scene` to video tensors ``[B, 3, T, H, W]`` in ``[-1, 1]``."""

    def __init__(self, device: str | torch.device = "cpu", photo_size: int = 512):
        self.device = torch.device(device)
        self.photos = _load_photo_bank(photo_size).to(self.device)

    @torch.no_grad()
    def render(self, scenes: list[Scene], frames: int, height: int, width: int, with_mask: bool = False):
        """Videos ``[B, 3, T, H, W]`` in ``[-1, 1]``; with ``with_mask`` also the objects' coverage
        ``[B, 1, T, H, W]`` in ``[0, 1]`` (the largest antialiased coverage of any object at each pixel), which
        the training losses use to weight the few object pixels against the background."""
        dev = self.device
        B, T, H, W = len(scenes), frames, height, width
        S = float(min(H, W))
        xs = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5 - W / 2) / S  # [W]
        ys = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5 - H / 2) / S  # [H]
        tt = torch.arange(T, device=dev, dtype=torch.float32)
        frac = tt / max(T - 1, 1)

        video = torch.empty(B, 3, T, H, W, device=dev)
        coverage = torch.zeros(B, 1, T, H, W, device=dev) if with_mask else None

        # 1. solid and gradient backgrounds: lerp(a, b, w) with w along y or x
        flat = [i for i, s in enumerate(scenes) if s.background != "photo"]
        if flat:
            a = torch.tensor([scenes[i].bg_a for i in flat], device=dev)
            b = torch.tensor([scenes[i].bg_b for i in flat], device=dev)
            wy = ((ys - ys[0]) / max(float(ys[-1] - ys[0]), 1e-6)).view(1, H, 1).expand(1, H, W)
            wx = ((xs - xs[0]) / max(float(xs[-1] - xs[0]), 1e-6)).view(1, 1, W).expand(1, H, W)
            vertical = torch.tensor([scenes[i].gradient == "vertical" for i in flat], device=dev).view(-1, 1, 1)
            w = torch.where(vertical, wy, wx)  # [n, H, W]
            img = a[:, :, None, None] + (b - a)[:, :, None, None] * w[:, None]
            video[flat] = img[:, :, None].expand(-1, -1, T, -1, -1)

        # 2. photo backgrounds through a moving / zooming camera window (one 5-D grid_sample)
        photo = [i for i, s in enumerate(scenes) if s.background == "photo"]
        if photo:
            idx = torch.tensor([PHOTO_NAMES.index(scenes[i].photo) for i in photo], device=dev)
            c0 = torch.tensor([scenes[i].cam_c0 for i in photo], device=dev)  # [n, 2]
            c1 = torch.tensor([scenes[i].cam_c1 for i in photo], device=dev)
            h0 = torch.tensor([scenes[i].cam_h0 for i in photo], device=dev)
            h1 = torch.tensor([scenes[i].cam_h1 for i in photo], device=dev)
            c = c0[:, None] + (c1 - c0)[:, None] * frac[None, :, None]  # [n, T, 2]
            h = h0[:, None] * (h1 / h0)[:, None] ** frac[None, :]  # [n, T], geometric zoom
            gx = c[..., 0, None, None] + 2.0 * h[..., None, None] * xs.view(1, 1, 1, W)  # [n, T, 1, W]
            gy = c[..., 1, None, None] + 2.0 * h[..., None, None] * ys.view(1, 1, H, 1)  # [n, T, H, 1]
            n = len(photo)
            grid = torch.stack(
                (gx.expand(n, T, H, W), gy.expand(n, T, H, W), torch.zeros(n, T, H, W, device=dev)), dim=-1
            )
            src = self.photos[idx][:, :, None]  # [n, 3, 1, P, P]
            video[photo] = F.grid_sample(src, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

        # 3. objects, composited in caption order with antialiased signed-distance coverage
        for k in range(MAX_OBJECTS):
            for shape_name, shape_id in SHAPE_INDEX.items():
                sel = [i for i, s in enumerate(scenes) if len(s.objects) > k and s.objects[k].shape == shape_name]
                if not sel:
                    continue
                objs = [scenes[i].objects[k] for i in sel]
                p0 = torch.tensor([o.pos0 for o in objs], device=dev)
                vel = torch.tensor([o.vel for o in objs], device=dev)
                r = torch.tensor([o.radius for o in objs], device=dev).view(-1, 1, 1, 1)
                rgb = torch.tensor([o.rgb for o in objs], device=dev)
                cx = p0[:, 0, None] + vel[:, 0, None] * tt  # [n, T]
                cy = p0[:, 1, None] + vel[:, 1, None] * tt
                dx = (xs.view(1, 1, 1, W) - cx[..., None, None]) / r  # [n, T, 1, W]
                dy = (ys.view(1, 1, H, 1) - cy[..., None, None]) / r  # [n, T, H, 1]
                dist = _shape_distance(shape_id, dx, dy) * r * S  # pixels
                alpha = (0.5 - dist).clamp_(0.0, 1.0)[:, None]  # [n, 1, T, H, W]
                sel_t = torch.tensor(sel, device=dev)
                cur = video.index_select(0, sel_t)
                video.index_copy_(0, sel_t, cur + (rgb[:, :, None, None, None] - cur) * alpha)
                if coverage is not None:
                    coverage.index_copy_(0, sel_t, torch.maximum(coverage.index_select(0, sel_t), alpha))

        # 4. lighting ramps
        gains = []
        for s in scenes:
            if s.lighting == "brighter":
                gains.append((0.5, 1.15))
            elif s.lighting == "darker":
                gains.append((1.1, 0.4))
            else:
                gains.append((1.0, 1.0))
        g = torch.tensor(gains, device=dev)
        gain = g[:, 0, None] + (g[:, 1] - g[:, 0])[:, None] * frac  # [B, T]
        video.mul_(gain.view(B, 1, T, 1, 1)).clamp_(0.0, 1.0)
        video.mul_(2.0).sub_(1.0)
        return (video, coverage) if with_mask else video


def make_clips(renderer: Renderer, seed: int, stream: str, step: int, batch: int, frames: int, height: int,
               width: int, split: str = "train", backgrounds: tuple[float, float, float] = BACKGROUND_WEIGHTS,
               with_mask: bool = False):
    """Render one batch of the (seed, stream, step) data stream: videos in [-1, 1], captions, scenes (and,
    with ``with_mask``, the objects' coverage ``[B, 1, T, H, W]`` as a fourth item)."""
    scenes = SceneSampler(split, backgrounds).batch(seed, stream, step, batch, frames, height, width)
    out = renderer.render(scenes, frames, height, width, with_mask=with_mask)
    if with_mask:
        return out[0], [s.caption for s in scenes], scenes, out[1]
    return out, [s.caption for s in scenes], scenes

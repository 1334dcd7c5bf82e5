"""Procedural "synthetic scenes": RGB images with dense labels that span difficulty.

Every sample has a difficulty ``d`` in [0, 1]. At ``d = 0`` a scene is one large
object on a plain background; as ``d`` grows the scene gets more, smaller and
overlapping objects, lower contrast, colour jitter, background clutter, an
illumination gradient, pixel noise and blur. Class 0 is the background; object
classes come in pairs that share a colour and differ only in texture (stripes,
checks, dots, waves), so the hard end can only be solved by reading texture.

With 6 or more classes the last two classes are a **context pair**: they look
exactly alike and only a cue away from them tells them apart. Scenes of
difficulty above 0.3 (all of them above 0.6) hold the pair and get a light or
dark background; context objects in a light scene are one class and those in a
dark scene the other. A neutral grey mat around each context object hides the
tone nearby, and object colours do not carry it, so labelling them takes a
receptive field that reaches past the mat (or global pooling). Easy scenes never
hold them, so a shallow, local model still solves easy scenes.

Samples are generated on the fly from ``(seed, split, index)`` with numpy, so
they are deterministic, independent of the order they are read in, different
between splits, and safe to generate in DataLoader workers.
"""
from __future__ import annotations

import colorsys
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mexify.data.base import SegDataset
from mexify.errors import DataError, nearest

log = logging.getLogger(__name__)

__all__ = ["SceneConfig", "SyntheticScenes", "SPLITS", "TEXTURES", "render_scene", "context_classes", "write_folder"]

SPLITS = {"train": 0, "val": 1, "calib": 2, "test": 3}
TEXTURES = ("stripes", "checks", "dots", "waves")
_TEX_ABBR = {"stripes": "striped", "checks": "checked", "dots": "dotted", "waves": "wavy"}
_HUE_NAMES = [
    (0.00, "red"), (0.08, "orange"), (0.15, "yellow"), (0.25, "lime"), (0.33, "green"), (0.45, "teal"),
    (0.52, "cyan"), (0.60, "azure"), (0.67, "blue"), (0.75, "violet"), (0.83, "purple"), (0.92, "pink"),
]


@dataclass(frozen=True)
class SceneConfig:
    """Knobs of the synthetic scenes (all settable from the spec string).

    Attributes:
        classes: number of classes including background (>= 2).
        size: image side in pixels.
        n: samples in the train split.
        n_eval: samples in each of val / calib / test (default: n // 4).
        seed: seed of the sample stream (the split and index are mixed in).
        dmin, dmax: range of per-sample difficulty.
        mix: how difficulty is drawn in [dmin, dmax]: uniform, easy (skewed low), hard (skewed high).
        max_objects: objects in the hardest scenes (one in the easiest).
        noise, blur, contrast, clutter: multipliers of each degradation at the hard end (0 turns it off).
        context: how often hard scenes hold the context pair (0 turns the pair off: every object
            class is then a colour / texture class); needs classes >= 6. Python-only knob.
        cache: keep generated samples in memory.
    """

    classes: int = 8
    size: int = 256
    n: int = 2000
    n_eval: Optional[int] = None
    seed: int = 0
    dmin: float = 0.0
    dmax: float = 1.0
    mix: str = "uniform"
    max_objects: int = 12
    noise: float = 1.0
    blur: float = 1.0
    contrast: float = 1.0
    clutter: float = 1.0
    context: float = 1.0
    cache: bool = False

    def split_size(self, split: str) -> int:
        if split == "train":
            return self.n
        return self.n_eval if self.n_eval is not None else max(1, self.n // 4)


@dataclass(frozen=True)
class _ClassLook:
    name: str
    rgb: Tuple[float, float, float]
    texture: str
    angle: float
    period: float  # in units of image side


CONTEXT_MIN_CLASSES = 6
_TONES = (("light", 0.85), ("dark", 0.15))
_MAT = 0.09  # width of the neutral mat around a context object, in units of image side


def context_classes(num_classes: int, context: float = 1.0) -> Tuple[int, ...]:
    """The context pair ``(class on light scenes, class on dark scenes)``, or ``()`` when there is none."""
    if context <= 0 or num_classes < CONTEXT_MIN_CLASSES:
        return ()
    return (num_classes - 2, num_classes - 1)


def class_looks(num_classes: int, context: float = 1.0) -> List[_ClassLook]:
    """Appearance of each object class (index 0 = background, which has none).

    Pairs of classes share a hue and differ in texture; hues are spread evenly. The
    context pair (see :func:`context_classes`) shares one look entirely.
    """
    ctx = context_classes(num_classes, context)
    n_obj = num_classes - 1 - len(ctx)
    groups = (n_obj + 1) // 2 + (1 if ctx else 0)
    looks = [_ClassLook("background", (0.5, 0.5, 0.5), "plain", 0.0, 1.0)]
    if ctx:  # its own hue, after the texture groups
        g = groups - 1
        hue = (g / groups + 0.02) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, 0.75, 0.85)
        hname = min(_HUE_NAMES, key=lambda h: min(abs(h[0] - hue), 1 - abs(h[0] - hue)))[1]
        ctx_looks = [
            _ClassLook(f"ringed-{hname}-on-{tone}", tuple(rgb), "rings", 30.0, 1.0 / 12.0) for tone, _ in _TONES
        ]
    for c in range(1, 1 + n_obj):
        g, member = divmod(c - 1, 2)
        hue = (g / max(groups, 1) + 0.02) % 1.0
        sat = 0.75 if (g // 12) % 2 == 0 else 0.45
        val = 0.85
        rgb = colorsys.hsv_to_rgb(hue, sat, val)
        texture = TEXTURES[(2 * g + member) % len(TEXTURES)]
        angle = (g * 47.0 + member * 90.0) % 180.0
        period = 1.0 / (11.0 + 3.0 * ((g + member) % 3))
        hname = min(_HUE_NAMES, key=lambda h: min(abs(h[0] - hue), 1 - abs(h[0] - hue)))[1]
        looks.append(_ClassLook(f"{_TEX_ABBR[texture]}-{hname}", tuple(rgb), texture, angle, period))
    if ctx:
        looks.extend(ctx_looks)
    names = [lk.name for lk in looks]
    for i, lk in enumerate(looks):  # keep names unique when hues repeat
        if names.count(lk.name) > 1:
            looks[i] = replace(lk, name=f"{lk.name}-{i}")
    return looks


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, period: float, angle: float, phase: np.ndarray) -> np.ndarray:
    """Texture pattern in [-1, 1] on pixel coordinates (period in pixels)."""
    a = np.deg2rad(angle)
    u = (xx * np.cos(a) + yy * np.sin(a)) / period + phase[0]
    v = (-xx * np.sin(a) + yy * np.cos(a)) / period + phase[1]
    tau = 2 * np.pi
    if kind == "stripes":
        return np.tanh(3.0 * np.sin(tau * u))
    if kind == "checks":
        return np.tanh(4.0 * np.sin(tau * u) * np.sin(tau * v))
    if kind == "dots":
        return np.where(np.cos(tau * u) * np.cos(tau * v) > 0.35, 1.0, -0.6)
    if kind == "waves":
        return np.sin(tau * (u + 0.35 * np.sin(tau * v * 0.5)))
    if kind == "rings":
        return np.tanh(3.0 * np.sin(tau * np.hypot(u - phase[0], v - phase[1])))
    return np.zeros_like(yy)


def _draw_difficulty(rng: np.random.Generator, cfg: SceneConfig) -> float:
    u = float(rng.random())
    if cfg.mix == "easy":
        u = u * u
    elif cfg.mix == "hard":
        u = 1.0 - (1.0 - u) ** 2
    return cfg.dmin + (cfg.dmax - cfg.dmin) * u


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, 3) float image (reflect padding), in numpy.

    numpy keeps generation single-threaded, which is what DataLoader workers want
    and avoids thread-pool contention on small shared CPUs.
    """
    if sigma < 0.3:
        return img
    r = max(1, int(round(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape[:2]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="reflect")
    out = k[0] * p[0:h]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[i : i + h]
    p = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="reflect")
    out = k[0] * p[:, 0:w]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[:, i : i + w]
    return out


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation matrix ``(n_out, n_in)`` (half-pixel centres, edges clamped)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    f = (src - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), lo] += 1 - f
    m[np.arange(n_out), hi] += f
    return m


def _smooth_field(rng: np.random.Generator, s: int, channels: int, cells: int = 6) -> np.ndarray:
    """Low-frequency random field ``(s, s, channels)`` with unit-ish amplitude."""
    low = rng.standard_normal((channels, cells, cells)).astype(np.float32)
    m = _interp_matrix(s, cells)
    return np.stack([m @ low[c] @ m.T for c in range(channels)], axis=-1)


def _paint_background(cfg: SceneConfig, rng: np.random.Generator, image: np.ndarray, ys: np.ndarray, d: float,
                      tone: Optional[int]) -> np.ndarray:
    """Fill ``image`` with the background (the context ``tone`` when given); returns its colour."""
    s = cfg.size
    # background: plain, low-saturation; clutter and light gradient grow with d
    bg_hue, bg_val = rng.random(), 0.35 + 0.3 * rng.random()
    if tone is not None:
        bg_val = _TONES[tone][1] + 0.06 * (rng.random() - 0.5)
    bg = np.array(colorsys.hsv_to_rgb(bg_hue, 0.15 * rng.random(), bg_val), dtype=np.float32)
    image[:] = bg
    clutter = cfg.clutter * d
    if clutter > 0:
        field = _smooth_field(rng, s, 4)
        image += (0.09 * clutter) * field[..., :1] + (0.03 * clutter) * field[..., 1:]
        if rng.random() < d:  # distractor texture in the background
            yy, xx = np.meshgrid(ys, ys, indexing="ij")
            kind = TEXTURES[rng.integers(len(TEXTURES))]
            pat = _texture(kind, yy, xx, s / rng.uniform(8, 16), rng.uniform(0, 180), rng.random(2))
            image += (0.07 * clutter) * pat[..., None]
    return bg


def _draw_object(cfg: SceneConfig, rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, ys: np.ndarray,
                 look: "_ClassLook", c: int, ctx: Sequence[int], ref: np.ndarray, contrast: float, d: float,
                 single: bool) -> None:
    """Draw one object of class ``c`` into ``image`` and ``mask`` (in place)."""
    s = cfg.size
    r = s * (0.33 - 0.24 * d) * rng.uniform(0.75, 1.2)
    if single:
        cy, cx = s * rng.uniform(0.38, 0.62, size=2)
    else:
        cy, cx = s * rng.uniform(0.05, 0.95, size=2)
    y0, y1 = int(max(0, cy - 1.5 * r)), int(min(s, cy + 1.5 * r + 1))
    x0, x1 = int(max(0, cx - 1.5 * r)), int(min(s, cx + 1.5 * r + 1))
    if y1 <= y0 or x1 <= x0:
        return
    yy, xx = np.meshgrid(ys[y0:y1] - cy, ys[x0:x1] - cx, indexing="ij")
    rot = rng.uniform(0, np.pi)
    cr, sr = np.cos(rot), np.sin(rot)
    u, v = xx * cr + yy * sr, -xx * sr + yy * cr
    aspect = rng.uniform(0.6, 1.0)
    shape = rng.integers(3)
    if shape == 0:  # ellipse
        inside = (u / r) ** 2 + (v / (r * aspect)) ** 2 <= 1.0
    elif shape == 1:  # rotated rectangle
        inside = (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r * aspect)
    else:  # blob: wobbly radius
        ang = np.arctan2(v, u)
        wob = 1.0 + 0.25 * np.sin(3 * ang + rng.uniform(0, 6.3)) + 0.1 * np.sin(5 * ang + rng.uniform(0, 6.3))
        inside = np.hypot(u, v * (1.0 / aspect)) <= r * wob
    if not inside.any():
        return
    # colour: class hue with jitter that grows with d, pulled toward the background by low contrast
    jitter = (0.04 + 0.12 * d) * rng.standard_normal(3)
    rgb = np.clip(np.asarray(look.rgb) + jitter, 0, 1)
    rgb = ref + contrast * (rgb - ref)
    if c in ctx:  # a neutral mat around the object hides the background tone nearby
        m = r * 1.15 + _MAT * s
        my0, my1 = int(max(0, cy - m)), int(min(s, cy + m + 1))
        mx0, mx1 = int(max(0, cx - m)), int(min(s, cx + m + 1))
        in_mat = (ys[my0:my1, None] - cy) ** 2 + (ys[None, mx0:mx1] - cx) ** 2 <= m * m
        in_mat &= mask[my0:my1, mx0:mx1] == 0  # under the objects already there
        image[my0:my1, mx0:mx1][in_mat] = 0.5
        mask[my0:my1, mx0:mx1][in_mat] = 0
    if look.texture == "rings":  # concentric around the object's centre
        pat = _texture(look.texture, yy, xx, look.period * s, 0.0, 0.15 * rng.random(2))
    else:
        pat = _texture(look.texture, yy + cy, xx + cx, look.period * s, look.angle + rng.normal(0, 6 * d), rng.random(2))
    amp = 0.28 * max(contrast, 0.45)
    patch = rgb[None, None, :] * (1.0 + amp * pat[..., None])
    region = image[y0:y1, x0:x1]
    region[inside] = patch[inside]
    mask[y0:y1, x0:x1][inside] = c


def _degrade(cfg: SceneConfig, rng: np.random.Generator, image: np.ndarray, ys: np.ndarray, d: float) -> np.ndarray:
    """Light gradient, blur and noise, all growing with ``d``."""
    s = cfg.size
    if d > 0:
        g = rng.uniform(-1, 1, size=2) * 0.18 * cfg.clutter * d
        image += (g[0] * (ys[:, None] / s - 0.5) + g[1] * (ys[None, :] / s - 0.5))[..., None]
        sigma = cfg.blur * 1.6 * d * d * (s / 128.0)
        image = _gaussian_blur(image, sigma)
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(0.07 * cfg.noise * d)
    return image


def render_scene(cfg: SceneConfig, rng: np.random.Generator, looks: List[_ClassLook], d: float) -> Tuple[np.ndarray, np.ndarray]:
    """Render one scene of difficulty ``d``.

    Returns:
        ``(image, mask)``: float32 ``(H, W, 3)`` in [0, 1] and uint8 ``(H, W)``.
    """
    s = cfg.size
    k = cfg.classes
    ys = np.arange(s, dtype=np.float32)
    image = np.empty((s, s, 3), dtype=np.float32)
    mask = np.zeros((s, s), dtype=np.uint8)

    # context pair: only in scenes above d = 0.3, in every scene above d = 0.6; the background tone decides the class
    ctx = context_classes(k, cfg.context)
    tone = int(rng.integers(len(_TONES)))
    with_ctx = bool(ctx) and rng.random() < min(1.0, cfg.context * (d - 0.3) / 0.3)

    bg = _paint_background(cfg, rng, image, ys, d, tone if with_ctx else None)

    # objects: one large below d=0.1, many small overlapping at d=1
    n_obj = 1 + int(round((cfg.max_objects - 1) * max(0.0, d - 0.1) / 0.9 * rng.uniform(0.6, 1.0)))
    contrast = float(np.clip(1.0 - 0.6 * cfg.contrast * d, 0.15, 1.0))
    # colours are pulled toward a neutral grey, not the background, in scenes with the context pair,
    # so that no object carries the background tone
    ref = np.full(3, 0.5, dtype=np.float32) if with_ctx else bg
    for i in range(n_obj):
        if with_ctx and (i == 0 or rng.random() < 0.35):
            c = ctx[tone]
        else:
            c = int(rng.integers(1, k - len(ctx)))
        _draw_object(cfg, rng, image, mask, ys, looks[c], c, ctx, ref, contrast, d, single=n_obj == 1)
    image = _degrade(cfg, rng, image, ys, d)
    np.clip(image, 0.0, 1.0, out=image)
    return image.astype(np.float32, copy=False), mask


class SyntheticScenes(SegDataset):
    """The procedural synthetic-scenes dataset (see the module docstring).

    Args:
        cfg: the knobs.
        split: train, val, calib or test (each draws its own sample stream).
        transform: joint transform applied after rendering.

    Raises:
        DataError: unknown split or invalid knobs.
    """

    def __init__(self, cfg: SceneConfig, split: str = "train", transform=None):
        if split not in SPLITS:
            close = nearest(split, SPLITS, n=1)
            raise DataError(
                f"unknown split {split!r} for synthetic:scenes",
                f"use one of {', '.join(SPLITS)}" + (f" (did you mean {close[0]!r}?)" if close else ""),
            )
        if not 2 <= cfg.classes <= 255:
            raise DataError(f"synthetic:scenes needs 2 <= classes <= 255, got {cfg.classes}", "e.g. classes=8")
        if cfg.size < 16:
            raise DataError(f"synthetic:scenes needs size >= 16, got {cfg.size}", "e.g. size=128")
        if not 0.0 <= cfg.dmin <= cfg.dmax <= 1.0:
            raise DataError(f"synthetic:scenes needs 0 <= dmin <= dmax <= 1, got dmin={cfg.dmin} dmax={cfg.dmax}", "e.g. dmin=0&dmax=1")
        self.cfg = cfg
        self.split = split
        self.looks = class_looks(cfg.classes, cfg.context)
        super().__init__(cfg.classes, [lk.name for lk in self.looks], transform=transform)
        self._len = cfg.split_size(split)
        self._cache: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._difficulty: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self._len

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, SPLITS[self.split], int(index)])

    def difficulty(self, index: int) -> float:
        """Difficulty in [0, 1] of sample ``index`` (cheap: no rendering)."""
        return _draw_difficulty(self._rng(index), self.cfg)

    def difficulties(self) -> np.ndarray:
        """Difficulty of every sample, as a float array ``(len,)``."""
        if self._difficulty is None:
            self._difficulty = np.array([self.difficulty(i) for i in range(len(self))], dtype=np.float32)
        return self._difficulty

    def render(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Raw sample ``index`` as numpy: image float32 ``(H, W, 3)`` in [0, 1], mask uint8 ``(H, W)``."""
        rng = self._rng(index)
        d = _draw_difficulty(rng, self.cfg)
        return render_scene(self.cfg, rng, self.looks, d)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.cache and index in self._cache:
            return self._cache[index]
        img, mask = self.render(index)
        out = (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(mask.astype(np.int64)))
        if self.cfg.cache:
            self._cache[index] = out
        return out

    def __repr__(self) -> str:
        return f"SyntheticScenes(split={self.split!r}, n={len(self)}, {self.cfg})"


def write_folder(cfg: SceneConfig, root: Union[str, Path], splits: Sequence[str] = ("train", "val")) -> Dict[str, np.ndarray]:
    """Render scenes as PNG files in the ``folder:`` layout (``ROOT/<split>/images`` and ``masks``, matching
    stems, ``classes.txt``): the same scenes as another dataset would hand them over.

    Returns:
        each split's per-image difficulty, in file order.
    """
    from PIL import Image

    root = Path(root)
    out = {}
    for split in splits:
        ds = SyntheticScenes(cfg, split=split)
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(len(ds)):
            img, mask = ds.render(i)
            Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(root / split / "images" / f"{i:04d}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / split / "masks" / f"{i:04d}.png")
        out[split] = ds.difficulties()
        (root / "classes.txt").write_text("\n".join(ds.class_names) + "\n")
    return out

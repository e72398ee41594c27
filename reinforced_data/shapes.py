"""The embedded default corpus: procedurally rendered coloured shapes with compositional captions.

Every later command (build-data, train, eval, export, bench) runs on it with no download. Scenes hold one or two
shapes ("a small red circle left of a large blue square"); a separate labelled split of single-shape images
(`zeroshot/<colour shape>/*.png`) is laid out like an image-folder classification set, so `distill eval` scores it
with prompts exactly as it scores CIFAR-10. Everything is a pure function of `(seed, split, index)`, so any sample
can be regenerated independently and the corpus is bit-identical across runs and machines.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mcd_common.files import atomic_path, atomic_write_bytes

__all__ = [
    "DEFAULT_CORPUS_DIR",
    "COLOURS",
    "SHAPES",
    "SIZES",
    "ZEROSHOT_TEMPLATES",
    "CorpusCfg",
    "default_corpus",
    "render_scene",
    "ensure_shapes_corpus",
    "shapes_classes",
    "write_shapes_corpus",
]

# NOTE: colour and shape names are the class vocabulary; keep them single words the CLIP BPE knows.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 0.22, "large": 0.38}  # shape radius as a fraction of the image side
RELATIONS: dict[str, tuple[str, ...]] = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
}
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "a {} on a plain background.",
    "an image showing a {}.",
)
_SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges without a vector renderer


@dataclass(frozen=True)
class CorpusCfg:
    """Parameters that fully determine the corpus (stored in `corpus.json`)."""

    seed: int = 0
    """Root seed; every sample's RNG derives from (seed, split, index)."""
    image_size: int = 64
    """Side of the square images in pixels."""
    n_train: int = 6000
    """Training scenes (one or two shapes)."""
    n_val: int = 500
    """Held-out scenes for retrieval, each with several captions."""
    n_zeroshot_per_class: int = 10
    """Single-shape images per `colour shape` class in the zero-shot split."""
    shard_size: int = 1000
    """Samples per webdataset tar shard."""


def shapes_classes() -> list[str]:
    """Zero-shot class names, `"<colour> <shape>"`, in a fixed order."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # NOTE: a stable hash (not Python's salted hash) keeps samples identical across processes and runs.
    digest = hashlib.sha256(f"{seed}/{split}/{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "cross":
        w = 0.33
        pts = [
            (-w, -1),
            (w, -1),
            (w, -w),
            (1, -w),
            (1, w),
            (w, w),
            (w, 1),
            (-w, 1),
            (-w, w),
            (-1, w),
            (-1, -w),
            (-w, -w),
        ]
    else:
        raise ValueError(f"unknown polygon shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], cx: float, cy: float, r: float, angle: float
) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=colour)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    # Light, low-contrast gradient plus noise: shapes stay the only salient content.
    base = rng.uniform(150, 235, size=3)
    tilt = rng.uniform(-25, 25, size=3)
    ramp = np.linspace(-0.5, 0.5, size)[None, :, None] * tilt[None, None, :]
    img = base[None, None, :] + ramp + rng.normal(0, 6, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def render_scene(
    seed: int, split: str, index: int, image_size: int = 64, n_objects: int | None = None
) -> tuple[Image.Image, list[str], dict]:
    """Render one scene.

    Args:
        seed: Corpus seed.
        split: Split name, part of the per-sample seed.
        index: Sample index within the split.
        image_size: Output side in pixels.
        n_objects: 1 or 2 shapes; None draws it at random (40 % single, 60 % pairs).

    Returns:
        The RGB image, a list of captions (first is the canonical one), and metadata with the objects drawn
        (`colour`, `shape`, `size`) and, for pairs, the spatial relation of the first to the second.
    """
    rng = _rng(seed, split, index)
    n = n_objects if n_objects is not None else (1 if rng.random() < 0.4 else 2)
    side = image_size * _SUPERSAMPLE
    img = _background(rng, image_size).resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    colours = list(COLOURS)
    objs = []
    for _ in range(n):
        # NOTE: two objects never share both colour and shape, so captions are unambiguous.
        while True:
            obj = {
                "colour": colours[int(rng.integers(len(colours)))],
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "size": "small" if rng.random() < 0.5 else "large",
            }
            if all((o["colour"], o["shape"]) != (obj["colour"], obj["shape"]) for o in objs):
                break
        objs.append(obj)

    relation = None
    if n == 1:
        r = SIZES[objs[0]["size"]] * side
        jitter = side * 0.5 - r
        centres = [(side / 2 + rng.uniform(-0.5, 0.5) * jitter, side / 2 + rng.uniform(-0.5, 0.5) * jitter)]
    else:
        relation = ("left", "right", "above", "below")[int(rng.integers(4))]
        r_max = max(SIZES[o["size"]] for o in objs) * side * 0.75
        a_pos, b_pos = side * 0.27, side * 0.73
        cross = side / 2 + rng.uniform(-0.08, 0.08) * side
        first, second = (a_pos, b_pos) if relation in ("left", "above") else (b_pos, a_pos)
        if relation in ("left", "right"):
            centres = [(first, cross), (second, cross)]
        else:
            centres = [(cross, first), (cross, second)]
        # Pairs use slightly smaller shapes so they never overlap.
        objs = [dict(o, _r=min(SIZES[o["size"]] * side * 0.75, r_max)) for o in objs]
    for obj, (cx, cy) in zip(objs, centres, strict=True):
        r = obj.pop("_r", SIZES[obj["size"]] * side)
        _draw_shape(draw, obj["shape"], COLOURS[obj["colour"]], cx, cy, r, float(rng.uniform(-0.3, 0.3)))
    img = img.resize((image_size, image_size), Image.LANCZOS)
    captions = _captions(objs, relation, rng)
    return img, captions, {"objects": objs, "relation": relation}


def _phrase(obj: dict, with_size: bool = True) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}" if with_size else f"{obj['colour']} {obj['shape']}"


def _captions(objs: list[dict], relation: str | None, rng: np.random.Generator) -> list[str]:
    if len(objs) == 1:
        o = objs[0]
        caps = [
            f"a {_phrase(o)}",
            f"a {_phrase(o, False)} on a plain background",
            f"a single {_phrase(o)} in the middle",
            f"one {o['colour']} {o['shape']}",
            f"a picture of a {_phrase(o)}",
        ]
    else:
        a, b = objs
        rel_a = RELATIONS[relation][int(rng.integers(len(RELATIONS[relation])))]
        inverse = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
        rel_b = RELATIONS[inverse][0]
        caps = [
            f"a {_phrase(a)} {rel_a} a {_phrase(b)}",
            f"a {_phrase(b)} {rel_b} a {_phrase(a)}",
            f"a {_phrase(a, False)} and a {_phrase(b, False)}",
            f"two shapes: a {_phrase(a)} and a {_phrase(b)}",
            f"a {a['colour']} {a['shape']} {rel_a} a {b['colour']} {b['shape']}",
        ]
    return caps


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _write_shard(path: Path, samples: list[tuple[str, bytes, str, dict]]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, jpg, txt, meta in samples:
            for ext, data in (("jpg", jpg), ("txt", txt.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0  # NOTE: fixed mtime keeps shards byte-identical across runs
                tar.addfile(info, io.BytesIO(data))


DEFAULT_CORPUS_DIR = "~/.cache/mobileclip-distill/shapes"
"""Where the default corpus is generated when no data is given (build-data, train, eval)."""


def default_corpus(corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR) -> Path:
    """Generate (once) the default corpus under `corpus_dir` and return its root (see `ensure_shapes_corpus`)."""
    root = Path(os.path.expanduser(str(corpus_dir)))
    ensure_shapes_corpus(root)
    return root


def ensure_shapes_corpus(root: str | os.PathLike) -> dict:
    """The `corpus.json` of the corpus at `root`, writing the default corpus first when none is complete there.

    An existing complete corpus (`corpus.json` is written last) is used as is, whatever its config, so a smaller or
    custom corpus written with `write_shapes_corpus` stands in for the default one.
    """
    meta_path = Path(os.path.expanduser(str(root))) / "corpus.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    return write_shapes_corpus(meta_path.parent)


def write_shapes_corpus(out: str | os.PathLike, cfg: CorpusCfg | None = None) -> dict:
    """Write the corpus (idempotent: an existing, identical corpus is kept).

    Layout: `train/shapes-train-NNNNNN.tar` and `val/shapes-val-NNNNNN.tar` (webdataset: `jpg`, `txt`, `json` with
    all captions and objects), `zeroshot/<colour shape>/NNNN.png`, and `corpus.json` (config, classes, prompt
    templates, shard lists). `corpus.json` is written last, so its presence marks a complete corpus.

    Args:
        out: Output directory.
        cfg: Corpus parameters; defaults to `CorpusCfg()`.

    Returns:
        The contents of `corpus.json`.
    """
    cfg = cfg or CorpusCfg()
    root = Path(out)
    meta_path = root / "corpus.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("cfg") == asdict(cfg):
            return meta
    root.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        (root / split).mkdir(exist_ok=True)
        shards[split] = []
        for s, start in enumerate(range(0, n, cfg.shard_size)):
            samples = []
            for i in range(start, min(n, start + cfg.shard_size)):
                img, caps, info = render_scene(cfg.seed, split, i, cfg.image_size)
                key = f"shapes-{split}-{i:08d}"
                samples.append((key, _encode_jpeg(img), caps[0], {"uid": key, "captions": caps, **info}))
            name = f"{split}/shapes-{split}-{s:06d}.tar"
            _write_shard(root / name, samples)
            shards[split].append(name)
    classes = shapes_classes()
    for c, cls in enumerate(classes):
        folder = root / "zeroshot" / cls
        folder.mkdir(parents=True, exist_ok=True)
        colour, shape = cls.split(" ")
        for i in range(cfg.n_zeroshot_per_class):
            index = c * cfg.n_zeroshot_per_class + i
            img = _render_single(cfg.seed, index, cfg.image_size, colour, shape)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            atomic_write_bytes(folder / f"{i:04d}.png", buf.getvalue())
    meta = {
        "name": "shapes",
        "version": 1,
        "cfg": asdict(cfg),
        "classes": classes,
        "templates": list(ZEROSHOT_TEMPLATES),
        "shards": shards,
        "num_samples": {"train": cfg.n_train, "val": cfg.n_val, "zeroshot": len(classes) * cfg.n_zeroshot_per_class},
    }
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    return meta


def _render_single(seed: int, index: int, image_size: int, colour: str, shape: str) -> Image.Image:
    """A single-shape image of a given class (the zero-shot split), with random size, position and background."""
    rng = _rng(seed, "zeroshot", index)
    side = image_size * _SUPERSAMPLE
    img = _background(rng, image_size).resize((side, side), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = SIZES["small" if rng.random() < 0.5 else "large"] * side
    jitter = side * 0.5 - r
    cx = side / 2 + rng.uniform(-0.5, 0.5) * jitter
    cy = side / 2 + rng.uniform(-0.5, 0.5) * jitter
    _draw_shape(draw, shape, COLOURS[colour], cx, cy, r, float(rng.uniform(-0.3, 0.3)))
    return img.resize((image_size, image_size), Image.LANCZOS)

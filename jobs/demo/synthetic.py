"""A small generated image dataset with a planted Clever-Hans cue, for the demo audit.

In the spirit of the PASCAL VOC horse images that carried a copyright tag (Lapuschkin et al. 2016;
Binder et al. 2016, Fig. 4): every image shows one object (a shape class) on a natural-looking
background, and most images of ONE class also carry a small text-like stamp in a fixed corner. A
classifier can solve that class by reading the stamp instead of looking at the object; an LRP audit
of the dataset should find it. Object boxes and the stamp box are known, so the finding can be checked.

Splits (``images/<split>/<class>/<split>-<index>.png`` plus one manifest per split):

``train``    the training distribution: the tag class carries the stamp with probability ``tag_rate``;
``audit``    a held-out sample of the same distribution: what the demo explains and audits;
``clean``    the audit images re-rendered without any stamp (the "tag removed" horse of Fig. 4);
``swapped``  the audit images with the stamp on every image of the other classes and none on the tag class;
``train_clean``  the training scenes without any stamp (on request): a model that cannot take the shortcut.

Comparing accuracy on ``audit``, ``clean`` and ``swapped`` shows how much the model depends on the stamp.
Every image is drawn from its own random stream ``(seed, split, index)``, so the data is deterministic
and ``clean``/``swapped`` show exactly the ``audit`` scenes. Only numpy, Pillow and pyarrow are needed.
"""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SPLITS = ("train", "audit", "clean", "swapped", "train_clean")
DEFAULT_SPLITS = SPLITS[:4]
_STREAM = {"train": 1, "train_clean": 1, "audit": 2, "clean": 2, "swapped": 2}  # pairs share their scenes
MAX_TILT = np.pi / 12  # objects are rotated by at most 15 degrees
BOX_PADDING = 2  # object boxes are this many pixels larger than the object on every side
SUPERSAMPLE = 4  # shapes are rasterised 4x finer and averaged down: anti-aliased edges

# 3x5 pixel glyphs: the stamp reads "(C)", like a copyright mark
_GLYPHS = {
    "(": ["01", "10", "10", "10", "01"],
    "C": ["111", "100", "100", "100", "111"],
    ")": ["10", "01", "01", "01", "10"],
}
STAMP_TEXT = "(C)"


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. The defaults make a dataset a tiny CNN learns (with the shortcut) in a minute."""

    classes: tuple[str, ...] = ("cross", "disc", "ring", "square", "triangle")  # sorted: the manifest's order
    tag_class: str = "ring"
    image_size: int = 48
    train_per_class: int = 250
    audit_per_class: int = 60
    tag_rate: float = 0.9
    corner: str = "bottom-left"  # where the stamp sits, like the horse images' copyright tag
    seed: int = 0

    def __post_init__(self):
        if self.tag_class not in self.classes:
            raise ValueError(f"tag_class {self.tag_class!r} is not one of the classes {list(self.classes)}")
        unknown = set(self.classes) - set(SHAPES)
        if unknown:
            raise ValueError(f"unknown shape classes {sorted(unknown)}; choose from {sorted(SHAPES)}")
        if self.image_size < 24:
            raise ValueError(f"image_size {self.image_size} is too small for a stamp and an object; use >= 24")
        if self.corner not in CORNERS:
            raise ValueError(f"corner {self.corner!r} must be one of {CORNERS}")
        if not 0.0 <= self.tag_rate <= 1.0:
            raise ValueError(f"tag_rate {self.tag_rate} must be in [0, 1]")

    @property
    def tag_index(self) -> int:
        return self.classes.index(self.tag_class)

    def per_class(self, split: str) -> int:
        return self.train_per_class if split.startswith("train") else self.audit_per_class


CORNERS = ("bottom-left", "bottom-right", "top-left", "top-right")


@dataclass
class SyntheticDataset:
    """Where a generated dataset lives and what is planted in it."""

    root: Path
    spec: SyntheticSpec
    tag_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) of the stamp, pixels, x1/y1 exclusive
    manifests: dict[str, Path] = field(default_factory=dict)  # split -> manifest Parquet
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {"images", "tagged", ...}

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.classes)

    def manifest(self, split: str) -> Path:
        return self.manifests[split]

    def read_manifest(self, split: str) -> pa.Table:
        return pq.read_table(self.manifests[split])


# ---- shapes -------------------------------------------------------------------------------------------
# Each shape is a predicate on coordinates (u, v) in the object's own frame (unit radius).

def _disc(u, v):
    return u * u + v * v <= 1.0


def _ring(u, v):
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.36)


def _square(u, v):
    return (np.abs(u) <= 0.75) & (np.abs(v) <= 0.75)


def _triangle(u, v):
    inside = np.ones_like(u, dtype=bool)
    for angle in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):  # 3 half-planes
        inside &= u * np.cos(angle) + v * np.sin(angle) <= 0.5
    return inside


def _cross(u, v):
    return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(u) <= 1.0) & (np.abs(v) <= 0.3))


SHAPES = {"disc": _disc, "ring": _ring, "square": _square, "triangle": _triangle, "cross": _cross}


# ---- rendering ----------------------------------------------------------------------------------------

def stamp_pixels() -> np.ndarray:
    """The stamp as a bool array (True = bright glyph pixel) with a one-pixel dark border around the text."""
    rows = ["".join(_GLYPHS[ch][r] + "0" for ch in STAMP_TEXT)[:-1] for r in range(5)]
    glyphs = np.array([[c == "1" for c in row] for row in rows])
    return np.pad(glyphs, 1, constant_values=False)


def stamp_box(size: int, corner: str, margin: int = 2) -> tuple[int, int, int, int]:
    """Where the stamp goes: (x0, y0, x1, y1), x1/y1 exclusive."""
    h, w = stamp_pixels().shape
    x0 = margin if corner.endswith("left") else size - margin - w
    y0 = margin if corner.startswith("top") else size - margin - h
    return x0, y0, x0 + w, y0 + h


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency random field in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Sky over ground with a soft horizon, cloudy low-frequency variation, a faint texture and noise."""
    y = (np.arange(size, dtype=np.float32) + 0.5) / size
    sky = rng.uniform(0.35, 0.9, 3) * np.array([0.8, 0.9, 1.0])
    ground = rng.uniform(0.15, 0.6, 3) * np.array([0.9, 1.0, 0.7])
    horizon = rng.uniform(0.35, 0.75)
    blend = 1.0 / (1.0 + np.exp(-(y - horizon) / rng.uniform(0.02, 0.12)))
    image = sky[None, None, :] * (1 - blend)[:, None, None] + ground[None, None, :] * blend[:, None, None]
    image = np.broadcast_to(image, (size, size, 3)).copy()
    image += 0.10 * _smooth_field(rng, size, 5)[..., None] * rng.uniform(0.5, 1.0, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2)
    image += 0.04 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))[..., None]
    return image


def _blend_shape(image, rng, predicate, cx, cy, radius, color, angle, shading=True):
    """Rasterise ``predicate`` anti-aliased at (cx, cy) and alpha-blend it in ``color``; returns its alpha.

    Only the window around the object is rasterised (fine grid of SUPERSAMPLE^2 points per pixel).
    Nine parameters: the drawing's geometry and colour, one each, as every shape class calls it.
    """
    size = image.shape[0]
    x0, y0 = max(int(cx - radius * 1.5), 0), max(int(cy - radius * 1.5), 0)
    x1, y1 = min(int(cx + radius * 1.5) + 2, size), min(int(cy + radius * 1.5) + 2, size)
    fy = y0 + (np.arange((y1 - y0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    fx = x0 + (np.arange((x1 - x0) * SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    dy, dx = np.meshgrid((fy - cy) / radius, (fx - cx) / radius, indexing="ij")
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    window = predicate(u, v).astype(np.float32)
    window = window.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))
    alpha = np.zeros(image.shape[:2], np.float32)
    alpha[y0:y1, x0:x1] = window
    paint = np.broadcast_to(np.asarray(color, np.float32), image.shape).copy()
    if shading:  # light from a random side, so the object is not a flat cut-out
        light = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        paint *= (1.0 + 0.25 * (((xs - cx) * np.cos(light) + (ys - cy) * np.sin(light)) / radius))[..., None]
    image[:] = image * (1 - alpha[..., None]) + paint * alpha[..., None]
    return alpha


def _overlaps(a, b, margin=0.0) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def render_scene(rng: np.random.Generator, shape: str, size: int, keep_clear: tuple[int, int, int, int]):
    """One scene: background, a few distractor blobs and the object. Returns (float image HxWx3, object box).

    Nothing is drawn over ``keep_clear`` (the stamp corner), so a stamp or its absence is the only
    difference between the tagged and untagged version of a scene.
    """
    image = _background(rng, size)
    for _ in range(rng.integers(0, 3)):  # distractors: small blobs of random colour
        r = rng.uniform(0.03, 0.06) * size
        cx, cy = rng.uniform(r, size - r, 2)
        if not _overlaps((cx - r, cy - r, cx + r, cy + r), keep_clear, margin=1.0):
            _blend_shape(image, rng, _disc, cx, cy, r, rng.uniform(0.1, 0.9, 3), 0.0, shading=False)
    for _ in range(100):
        radius = rng.uniform(0.2, 0.3) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        if not _overlaps((cx - radius, cy - radius, cx + radius, cy + radius), keep_clear, margin=BOX_PADDING + 1.0):
            break
    else:
        raise ValueError(f"no room for an object beside the stamp in a {size}x{size} image: use a larger image_size")
    color = rng.uniform(0.05, 0.95, 3)
    color[rng.integers(3)] = rng.uniform(0.7, 1.0)  # one saturated channel: a clearly coloured object
    angle = rng.uniform(-MAX_TILT, MAX_TILT)  # objects stand roughly upright, as in photographs
    alpha = _blend_shape(image, rng, SHAPES[shape], cx, cy, radius, color, angle)
    image += rng.normal(0.0, 0.03, image.shape)
    ys, xs = np.nonzero(alpha > 0.5)
    pad = BOX_PADDING  # like a human annotation: a little loose, never cutting the object's edge
    box = (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
           min(int(xs.max()) + 1 + pad, size), min(int(ys.max()) + 1 + pad, size))
    return np.clip(image, 0.0, 1.0), box


def apply_stamp(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Paint the stamp (white "(C)" on black, maximal contrast) into ``box``."""
    x0, y0, x1, y1 = box
    image = image.copy()
    image[y0:y1, x0:x1] = np.where(stamp_pixels()[..., None], 0.95, 0.05)
    return image


def _tagged(split: str, label: int, spec: SyntheticSpec, rng: np.random.Generator) -> bool:
    if split in ("clean", "train_clean"):
        return False
    if split == "swapped":
        return label != spec.tag_index
    return label == spec.tag_index and rng.random() < spec.tag_rate


# ---- writing ------------------------------------------------------------------------------------------

def generate(root: str | Path, spec: SyntheticSpec | None = None, splits=DEFAULT_SPLITS) -> SyntheticDataset:
    """Write the images and manifests under ``root``; returns where everything is.

    Manifests (``<split>.parquet`` and the same as ``<split>.csv``) have the columns the pipeline reads,
    ``path`` (absolute), ``label`` (class name), ``box`` (object box ``[x0, y0, x1, y1]`` in pixels), plus
    ``label_index``, ``tagged`` and ``tag_box`` for checking what the audit finds.
    """
    spec = spec or SyntheticSpec()
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    size = spec.image_size
    tag_box = stamp_box(size, spec.corner)
    dataset = SyntheticDataset(root=root, spec=spec, tag_box=tag_box)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        stream = _STREAM[split]
        records = []
        for label, name in enumerate(spec.classes):
            (root / "images" / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(spec.per_class(split)):
                index = label * spec.per_class(split) + k
                scene_rng = np.random.default_rng([spec.seed, stream, index, 0])
                tag_rng = np.random.default_rng([spec.seed, stream, index, 1])
                image, box = render_scene(scene_rng, name, size, tag_box)
                tagged = _tagged(split, label, spec, tag_rng)
                if tagged:
                    image = apply_stamp(image, tag_box)
                path = root / "images" / split / name / f"{split}-{index:05d}.png"
                Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path, compress_level=1)
                records.append({"path": str(path), "label": name, "label_index": label,
                                "box": [float(v) for v in box], "tagged": tagged,
                                "tag_box": [float(v) for v in tag_box]})
        table = pa.Table.from_pylist(records, schema=MANIFEST_SCHEMA)
        dataset.manifests[split] = root / f"{split}.parquet"
        pq.write_table(table, dataset.manifests[split])
        _write_csv(root / f"{split}.csv", records)
        tag_images = [r for r in records if r["label_index"] == spec.tag_index]
        dataset.counts[split] = {
            "images": len(records),
            "tagged": sum(r["tagged"] for r in records),
            "tag_class_tagged": sum(r["tagged"] for r in tag_images),
            "tag_class_images": len(tag_images),
        }
    (root / "dataset.json").write_text(json.dumps({
        "spec": asdict(spec), "class_names": list(spec.classes), "tag_class": spec.tag_class,
        "tag_box": list(tag_box), "stamp_text": STAMP_TEXT,
        "manifests": {k: str(v) for k, v in dataset.manifests.items()}, "counts": dataset.counts,
    }, indent=2))
    return dataset


MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("label_index", pa.int64()),
    ("box", pa.list_(pa.float32())),
    ("tagged", pa.bool_()),
    ("tag_box", pa.list_(pa.float32())),
])


def _write_csv(path: Path, records: list[dict]) -> None:
    """The same manifest as CSV (boxes as JSON lists "[x0, y0, x1, y1]"), for people and tools that prefer text."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "label_index", "box", "tagged", "tag_box"])
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "box": json.dumps(r["box"]), "tag_box": json.dumps(r["tag_box"])})


def load(root: str | Path) -> SyntheticDataset:
    """Reopen a dataset written by :func:`generate` (reads ``dataset.json``)."""
    root = Path(root).resolve()
    meta = json.loads((root / "dataset.json").read_text())
    spec_fields = dict(meta["spec"], classes=tuple(meta["spec"]["classes"]))
    return SyntheticDataset(root=root, spec=SyntheticSpec(**spec_fields), tag_box=tuple(meta["tag_box"]),
                            manifests={k: Path(v) for k, v in meta["manifests"].items()}, counts=meta["counts"])

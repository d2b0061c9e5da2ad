"""Dataset indexes: which images exist, their labels, boxes and masks, without decoding any image.

Three sources, all on any fsspec filesystem (local path or URL):

* an ImageFolder tree (``root/<class>/<image>``, torchvision's layout and class order),
* a manifest table (Parquet or CSV, read with pyarrow) with ``path`` and ``label``, optional ``labels``
  (multi-label list), ``box`` (x0, y0, x1, y1 in source pixels, one or several) and ``mask_path``,
* a Pascal VOC folder (``JPEGImages`` + ``Annotations`` XML: multi-label classes and object boxes).

The index is a compact Arrow table (metadata only) so the driver can plan a million-image run
without holding any image; images are decoded later, inside the actors, by :func:`read_image`
(Pillow, as torchvision's ImageFolder).
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import torch
from torchvision.datasets.folder import IMG_EXTENSIONS
from PIL import Image, ImageOps, UnidentifiedImageError

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

SAMPLE_SCHEMA = pa.schema([
    ("sample_id", pa.int64()),
    ("path", pa.string()),
    ("label", pa.int64()),                        # -1: none (multi-label or unlabelled)
    ("labels", pa.list_(pa.int64())),             # all true labels (empty when single-label)
    ("boxes", pa.list_(pa.list_(pa.float32(), 4))),  # source-pixel boxes (x0, y0, x1, y1)
    ("box_classes", pa.list_(pa.int64())),        # class of each box, -1 when unknown
    ("mask_path", pa.string()),                   # "" when none
])


class DatasetError(ValueError):
    """The dataset cannot be indexed; the message says which file or value to fix."""


@dataclass(frozen=True)
class DatasetIndex:
    """All samples of a dataset as an Arrow table (see SAMPLE_SCHEMA), plus what the source says about classes."""

    samples: pa.Table
    class_names: list[str] | None  # None when the source only has class indices
    kind: str
    source: str
    multi_label: bool

    def __len__(self) -> int:
        return self.samples.num_rows

    @property
    def max_boxes(self) -> int:
        counts = pc.list_value_length(self.samples["boxes"])
        return int(pc.max(counts).as_py() or 0) if len(self) else 0

    @property
    def has_masks(self) -> bool:
        return bool(len(self)) and bool(pc.any(pc.not_equal(self.samples["mask_path"], "")).as_py())

    def fingerprint(self) -> str:
        """sha256 of the index content (paths, labels, boxes, masks): a different dataset never resumes a store."""
        digest = hashlib.sha256()
        for batch in self.samples.to_batches(max_chunksize=65536):
            digest.update(json.dumps(batch.to_pydict(), separators=(",", ":")).encode())
        return digest.hexdigest()


def load_index(
    source: str,
    kind: str = "auto",
    class_names: Sequence[str] | None = None,
    split: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetIndex:
    """Index a dataset; ``kind`` is ``imagefolder``, ``manifest``, ``voc`` or ``auto`` (guessed from the source).

    ``class_names`` (e.g. from the model's weights) lets named labels map onto the model's class indices.
    """
    fs, root = fsspec.core.url_to_fs(str(source), **dict(storage_options or {}))
    if kind == "auto":
        kind = _guess_kind(fs, root, source)
    readers = {"imagefolder": _image_folder, "manifest": _manifest, "voc": _voc}
    if kind not in readers:
        raise DatasetError(f"unknown dataset kind {kind!r}: use one of {sorted(readers)} or 'auto'")
    rows, names, multi_label = readers[kind](fs, root, source, list(class_names) if class_names else None, split)
    if not rows:
        raise DatasetError(f"no images found in {source!r} ({kind}); check the path and the layout")
    _refuse_duplicates(rows, source)
    for sample_id, row in enumerate(rows):
        row["sample_id"] = sample_id
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    return DatasetIndex(table, names, kind, str(source), multi_label)


def _refuse_duplicates(rows: list[dict], source: str) -> None:
    """An image listed twice would be explained and aggregated twice: give it one row (several labels: ``labels``)."""
    seen: dict[str, int] = {}
    for row in rows:
        seen[row["path"]] = seen.get(row["path"], 0) + 1
    twice = [path for path, count in seen.items() if count > 1]
    if twice:
        raise DatasetError(f"{source!r} lists {len(twice)} image(s) more than once, e.g. {twice[0]!r} "
                           f"({seen[twice[0]]} times): list each image once (a multi-label image: one row with "
                           "'labels')")


def _guess_kind(fs, root: str, source: str) -> str:
    if root.lower().endswith((".parquet", ".pq", ".csv")):
        return "manifest"
    if not fs.isdir(root):
        raise DatasetError(f"dataset {source!r} does not exist (expected a folder or a .parquet/.csv manifest)")
    if fs.isdir(posixpath.join(root, "JPEGImages")) and fs.isdir(posixpath.join(root, "Annotations")):
        return "voc"
    return "imagefolder"


def _sample(path: str, label: int = -1, labels=(), boxes=(), box_classes=None, mask_path: str = "") -> dict:
    boxes = [list(map(float, box)) for box in boxes]
    return {"path": path, "label": int(label), "labels": sorted({int(x) for x in labels}), "boxes": boxes,
            "box_classes": list(box_classes) if box_classes is not None else [-1] * len(boxes),
            "mask_path": mask_path or ""}


def _full_path(fs, path: str) -> str:
    """A path the actors can open: protocol-qualified unless the filesystem is local."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _image_folder(fs, root, source, class_names, split):
    classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise DatasetError(f"{source!r} has no class folders: an ImageFolder is root/<class>/<image>")
    by_name = class_names is not None and set(classes) <= set(class_names)
    rows = []
    for folder_index, name in enumerate(classes):
        label = class_names.index(name) if by_name else folder_index
        for path in sorted(fs.find(posixpath.join(root, name))):
            if path.lower().endswith(IMG_EXTENSIONS):
                rows.append(_sample(_full_path(fs, path), label))
    return rows, (list(class_names) if by_name else classes), False


def _parse_list(value) -> list:
    """Manifest cells: a real list (Parquet) or text like '[1, 2]', '3;5' (CSV)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return []
        if value.startswith("["):
            return json.loads(value)
        return [part.strip() for part in value.replace(";", ",").split(",")] if ";" in value else [value]
    return list(value)


def _parse_boxes(value) -> list[list[float]]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, str):
        value = json.loads(value) if value.strip().startswith("[") else [float(v) for v in value.split(",")]
    value = list(value)
    boxes = [value] if value and not isinstance(value[0], (list, tuple, np.ndarray)) else value
    for box in boxes:
        if len(box) != 4:
            raise DatasetError(f"box {list(box)} must have 4 numbers (x0, y0, x1, y1)")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not np.isfinite([x0, y0, x1, y1]).all() or x1 < x0 or y1 < y0:
            raise DatasetError(f"box {list(box)} must be finite with x0 <= x1 and y0 <= y1 (x0, y0, x1, y1 in pixels)")
    return [[float(v) for v in box] for box in boxes]


def _manifest(fs, root, source, class_names, split):
    with fs.open(root, "rb") as file:
        data = file.read()
    if root.lower().endswith(".csv"):
        table = pa_csv.read_csv(io.BytesIO(data), convert_options=pa_csv.ConvertOptions(
            column_types={"path": pa.string(), "mask_path": pa.string(), "label": pa.string()}))
    else:
        table = pq.read_table(io.BytesIO(data))
    if "path" not in table.column_names:
        raise DatasetError(f"manifest {source!r} needs a 'path' column (found {table.column_names})")
    base = posixpath.dirname(root)
    records = table.to_pylist()
    multi_label = "labels" in table.column_names
    raw_labels = [r.get("label") for r in records]
    raw_multi = [_parse_list(r.get("labels")) for r in records]
    named = sorted({str(v) for v in raw_labels + [x for xs in raw_multi for x in xs]
                    if v not in (None, "") and not _is_int(v)})
    if named and class_names is None:
        class_names = named  # class names come from the manifest itself
    elif named:
        unknown = [name for name in named if name not in class_names]
        if unknown:
            raise DatasetError(f"manifest {source!r} has labels {unknown[:5]} that are not class names of the model")

    def index(value) -> int:
        if value is None or value == "":
            return -1
        return int(value) if _is_int(value) else class_names.index(str(value))

    rows = []
    for number, (record, raw, multi) in enumerate(zip(records, raw_labels, raw_multi), start=1):
        path = str(record["path"])
        if "://" not in path and not path.startswith("/"):
            path = posixpath.join(base, path)
        mask = str(record.get("mask_path") or "")
        if mask and "://" not in mask and not mask.startswith("/"):
            mask = posixpath.join(base, mask)
        try:
            boxes = _parse_boxes(record.get("box"))
        except DatasetError as error:
            raise DatasetError(f"manifest {source!r} row {number} ({record['path']}): {error}") from None
        rows.append(_sample(path if "://" in path else _full_path(fs, path), index(raw), [index(x) for x in multi],
                            boxes, mask_path=mask if not mask or "://" in mask else _full_path(fs, mask)))
    return rows, class_names, multi_label


def _is_int(value) -> bool:
    if isinstance(value, (int, np.integer)):
        return True
    try:
        int(str(value))
        return True
    except ValueError:
        return False


def _voc(fs, root, source, class_names, split):
    if split:
        listing = posixpath.join(root, "ImageSets", "Main", f"{split}.txt")
        if not fs.exists(listing):
            raise DatasetError(f"VOC split file {listing!r} does not exist")
        names = fs.cat(listing).decode().split()
        annotations = [posixpath.join(root, "Annotations", f"{name}.xml") for name in names]
    else:
        annotations = sorted(fs.glob(posixpath.join(root, "Annotations", "*.xml")))
    rows = []
    for annotation in annotations:
        try:
            tree = ElementTree.fromstring(fs.cat(annotation))
        except (OSError, ElementTree.ParseError) as error:
            raise DatasetError(f"cannot read VOC annotation {annotation!r}: {error}") from error
        filename = tree.findtext("filename") or posixpath.basename(annotation)[:-4] + ".jpg"
        boxes, box_classes = [], []
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in VOC_CLASSES:
                raise DatasetError(f"{annotation!r}: object class {name!r} is not a VOC class")
            box = obj.find("bndbox")
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([xmin - 1, ymin - 1, xmax, ymax])  # 1-based inclusive pixels -> pixel edges
            box_classes.append(VOC_CLASSES.index(name))
        labels = sorted(set(box_classes))
        path = _full_path(fs, posixpath.join(root, "JPEGImages", filename))
        rows.append(_sample(path, labels[0] if len(labels) == 1 else -1, labels, boxes, box_classes))
    return rows, list(VOC_CLASSES), True


# ---- decoding (runs inside the actors) ---------------------------------------------------------------
def _read_bytes(path: str, storage_options: Mapping[str, Any] | None) -> bytes:
    if "://" not in path:  # local files: the plain read, without fsspec's seekable-file layer
        with open(path, "rb") as file:
            return file.read()
    with fsspec.open(path, "rb", **dict(storage_options or {})) as file:
        return file.read()


def _decode(data: bytes, mode: str) -> torch.Tensor:
    """Pillow decodes (torchvision's own decoders are deprecated since 0.29); errors name the reason.

    The EXIF orientation is applied (a photo is explained upright, as viewers show it), 16-bit images are scaled
    to 8 bits (Pillow's own conversion would clip them at 255), CMYK, paletted, grayscale and RGBA images are
    converted by Pillow (alpha dropped)."""
    if not data:
        raise ValueError("cannot decode image: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            array = np.asarray(_eight_bit(image).convert(mode))
    except UnidentifiedImageError:
        raise ValueError("cannot decode image: not an image format Pillow reads") from None
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale scaled to 0..255, rounding; other modes as they are."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return image
    array = np.asarray(image).astype(np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(2 ** 31 - 1)
    return Image.fromarray(np.clip(np.rint(array * 255.0 / top), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str, storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Decode an image to a (3, H, W) uint8 RGB tensor; raises OSError/ValueError with the reason."""
    return _decode(_read_bytes(path, storage_options), "RGB")


def read_mask(path: str, storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Decode a mask image to a (H, W) bool tensor (nonzero = inside)."""
    return _decode(_read_bytes(path, storage_options), "L")[0] > 0

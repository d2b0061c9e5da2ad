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
import math
import posixpath
import re
import warnings
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
    skipped: tuple[str, ...] = ()  # ImageFolder files that are not images (by extension), warned about

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
    skipped: list[str] = []
    rows, names, multi_label = readers[kind](fs, root, source, list(class_names) if class_names else None, split,
                                             skipped)
    if not rows:
        raise DatasetError(f"no images found in {source!r} ({kind}); check the path and the layout")
    _refuse_duplicates(rows, source)
    for sample_id, row in enumerate(rows):
        row["sample_id"] = sample_id
    table = pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    return DatasetIndex(table, names, kind, str(source), multi_label, tuple(skipped))


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


#: what an ImageFolder reads: torchvision's extensions plus .gif (its first frame, as Pillow opens it)
IMAGE_EXTENSIONS = tuple(IMG_EXTENSIONS) + (".gif",)


def _printable(path: str) -> str:
    """A path as text, with the bytes of a name that is not valid UTF-8 shown as ``\\xe9`` escapes."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a name of bytes that are not UTF-8, decoded by Python with surrogate escapes
        return False


def _image_folder(fs, root, source, class_names, split, skipped):
    classes = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not classes:
        raise DatasetError(f"{source!r} has no class folders: an ImageFolder is root/<class>/<image>")
    by_name = class_names is not None and set(classes) <= set(class_names)
    rows, not_utf8 = [], [posixpath.join(root, name) for name in classes if not _utf8(name)]
    for folder_index, name in enumerate(classes):
        label = class_names.index(name) if by_name else folder_index
        if not _utf8(name):
            continue
        for path in sorted(fs.find(posixpath.join(root, name))):
            if not path.lower().endswith(IMAGE_EXTENSIONS):
                skipped.append(_printable(path))
            elif not _utf8(path):
                not_utf8.append(path)
            else:
                rows.append(_sample(_full_path(fs, path), label))
    if not_utf8:  # the store keeps paths as UTF-8 text: such a file could be neither stored nor skipped unseen
        raise DatasetError(f"{source!r} has {len(not_utf8)} file or folder name(s) that are not valid UTF-8, e.g. "
                           f"'{_printable(not_utf8[0])}': rename them to UTF-8 (e.g. convmv -f latin1 -t utf8 -r "
                           "--notest <folder>)")
    if skipped:
        warnings.warn(f"{source!r}: skipped {len(skipped)} file(s) that are not images by their extension "
                      f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {skipped[0]!r}", UserWarning, stacklevel=3)
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
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise DatasetError(f"labels {value!r} is not a JSON list ({error})") from None
        else:
            return [part.strip() for part in value.replace(";", ",").split(",")] if ";" in value else [value]
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise DatasetError(f"labels {value!r} must be a list of class indices or names")
    for item in value:
        if not isinstance(item, (str, int, float, np.integer, np.floating)) and item is not None:
            raise DatasetError(f"labels {list(value)!r} must be a list of class indices or names")
    return list(value)


def _parse_boxes(value) -> list[list[float]]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    try:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [float(v) for v in value.split(",")]
        value = list(value)
        boxes = [value] if value and not isinstance(value[0], (list, tuple, np.ndarray)) else value
        for box in boxes:
            if len(box) != 4:
                raise DatasetError(f"box {list(box)} must have 4 numbers (x0, y0, x1, y1)")
            x0, y0, x1, y1 = (float(v) for v in box)
            if not np.isfinite([x0, y0, x1, y1]).all() or x1 < x0 or y1 < y0:
                raise DatasetError(f"box {list(box)} must be finite with x0 <= x1 and y0 <= y1 "
                                   "(x0, y0, x1, y1 in pixels)")
        return [[float(v) for v in box] for box in boxes]
    except DatasetError:
        raise
    except (ValueError, TypeError) as error:  # 'three', a bad JSON text, a box that is not a list of numbers
        raise DatasetError(f"box {value!r} is not 4 numbers x0, y0, x1, y1 (or a list of such boxes): "
                           f"{error}") from None


def _read_table(data: bytes, root: str, source: str) -> pa.Table:
    """The manifest as an Arrow table; a file pyarrow cannot parse is a DatasetError naming it and why."""
    if not root.lower().endswith(".csv"):
        try:
            return pq.read_table(io.BytesIO(data))
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(f"cannot read Parquet manifest {source!r}: {error}") from None
    if not data.strip():
        raise DatasetError(f"manifest {source!r} is empty: a CSV manifest needs a header line (path,label,...) and "
                           "one line per image")
    if not data.endswith((b"\n", b"\r")):
        data += b"\n"  # pyarrow reads a last line without its newline, except a header alone
    ragged = []

    def invalid(row):
        ragged.append(row)
        return "skip"

    def read(threads: bool) -> pa.Table:
        return pa_csv.read_csv(
            io.BytesIO(data), read_options=pa_csv.ReadOptions(use_threads=threads),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=invalid),
            convert_options=pa_csv.ConvertOptions(
                column_types={"path": pa.string(), "mask_path": pa.string(), "label": pa.string(),
                              "labels": pa.string()}))
    try:
        table = read(True)
        if ragged and ragged[0].number is None:  # only the serial reader knows the line number
            ragged.clear()
            table = read(False)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(f"cannot parse CSV manifest {source!r}: {error}") from None
    if ragged:
        row = ragged[0]
        where = f"line {row.number} (row {row.number - 1})" if row.number is not None else "a line"
        raise DatasetError(f"CSV manifest {source!r} {where} has {row.actual_columns} fields where the header has "
                           f"{row.expected_columns} ({row.text[:200]!r}; {len(ragged)} such line(s)): quote a cell "
                           'that holds commas, e.g. "1,2,3,4"')
    return table


_INTEGRAL_TEXT = re.compile(r"[+-]?\d+(\.0*)?")  # "3", "-1", "2.0": the text of a class index


def _label(value, where: str):
    """A manifest label: a class index (an int; a whole float, as pandas writes an int column with a missing value;
    or its text, ``3`` or ``2.0``), a class name (any other text: ``cat``, ``1e3``, ``nan``), or None (missing:
    None, an empty cell, a NaN float). A float that is not whole (1.5, inf) is refused."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if not math.isfinite(number) or number != int(number):
            raise DatasetError(f"{where}: label {value!r} is not a class index (a whole number) nor a class name")
        return int(number)
    text = str(value).strip()
    if not text:
        return None
    return int(float(text)) if _INTEGRAL_TEXT.fullmatch(text) else text


def _manifest(fs, root, source, class_names, split, skipped):
    try:
        with fs.open(root, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise DatasetError(f"manifest {source!r} does not exist") from None
    except OSError as error:  # a folder named .csv, a permission
        raise DatasetError(f"cannot read manifest {source!r}: {type(error).__name__}: {error}") from None
    table = _read_table(data, root, source)
    if "path" not in table.column_names:
        raise DatasetError(f"manifest {source!r} needs a 'path' column (found {table.column_names})")
    if not table.num_rows:
        raise DatasetError(f"manifest {source!r} has a header but no rows: list one image per line")
    base = posixpath.dirname(root)
    records = table.to_pylist()
    multi_label = "labels" in table.column_names
    raw_labels, raw_multi = [], []
    for number, record in enumerate(records, start=1):
        where = f"manifest {source!r} row {number} ({record['path']})"
        if record["path"] is None or not str(record["path"]).strip():
            raise DatasetError(f"manifest {source!r} row {number} has no path")
        try:
            multi = _parse_list(record.get("labels"))
        except DatasetError as error:
            raise DatasetError(f"{where}: {error}") from None
        raw_labels.append(_label(record.get("label"), where))
        raw_multi.append([x for x in (_label(item, where) for item in multi) if x is not None])
    named = sorted({v for v in raw_labels + [x for xs in raw_multi for x in xs] if isinstance(v, str)})
    if named and class_names is None:
        class_names = named  # class names come from the manifest itself
    elif named:
        unknown = [name for name in named if name not in class_names]
        if unknown:
            raise DatasetError(f"manifest {source!r} has labels {unknown[:5]} that are not class names of the model")

    def index(value) -> int:
        if value is None:
            return -1
        return value if isinstance(value, int) else class_names.index(value)

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


def _voc(fs, root, source, class_names, split, skipped):
    if split:
        listing = posixpath.join(root, "ImageSets", "Main", f"{split}.txt")
        if not fs.exists(listing):
            raise DatasetError(f"VOC split file {listing!r} does not exist")
        try:
            names = fs.cat(listing).decode("utf-8").split()
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(f"cannot read VOC split file {listing!r}: {error}") from None
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
            if box is None:
                raise DatasetError(f"VOC annotation {annotation!r}: object {name!r} has no <bndbox>")
            try:
                xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (TypeError, ValueError):
                found = {k: box.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")}
                raise DatasetError(f"VOC annotation {annotation!r}: object {name!r} has a <bndbox> without 4 numbers "
                                   f"xmin, ymin, xmax, ymax (found {found})") from None
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

    The EXIF orientation is applied (a photo is explained upright, as viewers show it), 16-bit, 32-bit integer and
    32-bit float images are scaled to 8 bits (:func:`_eight_bit`; Pillow's own conversion would clip them at 255),
    CMYK, paletted, grayscale and RGBA images are converted by Pillow (alpha dropped), an animated GIF (WebP, PNG)
    is read as its first frame."""
    return _decoded(data, lambda image: np.asarray(_eight_bit(image).convert(mode)))


def _decoded(data: bytes, to_array) -> torch.Tensor:
    if not data:
        raise ValueError("cannot decode image: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = ImageOps.exif_transpose(image)
            array = to_array(image)
    except UnidentifiedImageError:
        raise ValueError("cannot decode image: not an image format Pillow reads") from None
    except Exception as error:
        raise ValueError(f"cannot decode image: {type(error).__name__}: {error}") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grayscale of more than 8 bits to 0..255 (rounding, never clipping a valid value); other modes as they are.

    * 16-bit (``I;16*``): value x 255 / 65535;
    * 32-bit integer (``I``): the same 16-bit reading when every value is within 0..65535 (Pillow's older mode of
      16-bit PNGs), else value x 255 / (2**31 - 1); a negative value is refused;
    * 32-bit float (``F``): values within 0..1 (the float-image convention) x 255; else values within 0..255 as
      they are; else (or NaN / infinite) refused, naming the range: the range of a float image is not in the file,
      and a per-image stretch would make a dark image look like a bright one."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return image
    array = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        if not np.isfinite(array).all():
            raise ValueError("32-bit float image with NaN or infinite values")
        low, high = float(array.min(initial=0)), float(array.max(initial=0))
        if low < 0 or high > 255:
            raise ValueError(f"32-bit float image with values in [{low:g}, {high:g}], neither within 0..1 nor "
                             "0..255: convert it to 8 or 16 bits")
        top = 1.0 if high <= 1 else 255.0
    elif image.mode == "I" and array.min(initial=0) < 0:
        raise ValueError(f"32-bit integer image with negative values (min {int(array.min())}): convert it to 8 or "
                         "16 bits")
    else:
        top = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) <= 65535 else float(2 ** 31 - 1)
    return Image.fromarray(np.clip(np.rint(array * 255.0 / top), 0, 255).astype(np.uint8), mode="L")


def read_image(path: str, storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Decode an image to a (3, H, W) uint8 RGB tensor; raises OSError/ValueError with the reason."""
    return _decode(_read_bytes(path, storage_options), "RGB")


def _mask_array(image: Image.Image) -> np.ndarray:
    """Inside (True) / outside of a mask image: every pixel that is not 0 is inside, read from the file's own values.

    Masks are boolean by design (the store keeps one bit a pixel, the aggregations ask "inside the object or not"),
    and non-zero is the one reading that is right for every kind of mask file: 0/255 and 0/1 masks, class-index masks
    (VOC ``SegmentationClass`` as gray or paletted, 255 the void border), colour masks (any colour channel not 0;
    alpha ignored) and 16-bit label PNGs (their raw values, not scaled to 8 bits first). A soft or JPEG-compressed
    mask has its faint edge inside too: threshold such a mask before the run (docs/pipeline.md)."""
    array = np.asarray(image)
    if array.ndim == 3:
        colour = [i for i, band in enumerate(image.getbands()) if band != "A"]
        return (array[..., colour] != 0).any(axis=-1)
    return array != 0


def read_mask(path: str, storage_options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Decode a mask image to a (H, W) bool tensor (see :func:`_mask_array` for what is inside)."""
    return _decoded(_read_bytes(path, storage_options), _mask_array)[0]

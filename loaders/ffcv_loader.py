"""FFCV files: write any dataset to ``.beton`` files and read them back with every cyclical knob.

One conversion writes three files side by side, from the name it is given (``m.beton``):

* ``m.train.beton`` and ``m.test.beton``: fields ``image`` (raw ``uint8 [C, H, W]`` arrays, or JPEG),
  ``label`` and ``index`` (the sample's position, so per-sample losses map back to the loss ledger);
* ``m.json``: what a model needs to know (classes, channels, size, mean/std), each file's size and
  content digest, and a checksum of itself, so a truncated, damaged or replaced file (or an edited
  description) is refused before ffcv reads it.

Reading goes through :class:`FFCVSource`, which :class:`cycdata.loaders.CyclicalLoader` uses for
``.beton`` data: the batch sampler (in the main process) decides each epoch's samples and batch
size, exactly as on the torch path; ffcv decodes them. ffcv 1.0.2 cannot take a custom order through
``order=`` and silently truncates a sample list that grows after the first epoch, so the source swaps
in its own traversal order and updates the loader's first order each epoch (SETUP.md). ffcv compiles
its pipeline once, with its operations' parameters frozen, so augmentation is never an ffcv operation
here: the ladder runs on the decoded batches, and strength changes need no recompilation.

**ImageNet-style files.** ``cycdata convert folder:PATH OUT.beton --jpeg 90 --max-resolution 256`` stores
each image whole, as JPEG, its longer side shrunk to at most 256 (``variable_size`` in the ``.json``). Such
files are read back at the run's image size by ffcv's crop decoders, so decoding cost follows the output
size: the test split (and every split without a ladder) through ``CenterCropRGBImageDecoder`` (the
evaluation crop, ratio 0.875), the training split under a ladder with a ``resized_crop`` rung through
``RandomResizedCropRGBImageDecoder`` at the batch's crop magnitude (:meth:`Ladder.sizing_magnitude
<cycdata.augment_ladder.ladder.Ladder.sizing_magnitude>`, in steps of 1/8, one compiled ffcv pipeline per
step in use; magnitude 0 is the centre crop). ffcv's crop takes fixed ranges, so the magnitude ``m`` maps to
scale ``(0.875² + m·(0.08 - 0.875²), 0.875² + m·(1 - 0.875²))`` and ratio ``((3/4)^m, (4/3)^m)``: the worker
path's ranges (:func:`~cycdata.augment_ladder.ops.crop_boxes`) for a square image, with ffcv's uniform
position at every ``m``.

ffcv is an optional extra, imported only when a ``.beton`` is written or read.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> info = convert("synthetic:40", folder / "s.beton", progress=False)
    >>> info.splits["train"]["samples"], info.splits["test"]["samples"]
    (40, 10)
    >>> data = BetonDataset(folder / "s.beton", "train")
    >>> image, label = data[3]
    >>> image.shape, image.dtype
    (torch.Size([3, 32, 32]), torch.uint8)
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import queue
import signal
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .datasets import DatasetError, DatasetSplits, ImageFileDataset, TensorImageDataset, load_dataset

__all__ = [
    "FFCV_MISSING",
    "BetonDataset",
    "BetonError",
    "BetonInfo",
    "FFCVMissingError",
    "FFCVSource",
    "UnverifiedBetonWarning",
    "beton_digest",
    "beton_paths",
    "check_beton",
    "convert",
    "load_beton",
    "require_ffcv",
    "verify_beton",
]

FFCV_MISSING = (
    "reading or writing .beton files needs ffcv: install the apt packages libopencv-dev libturbojpeg0-dev "
    "pkg-config g++ python3-dev, then pip install 'cycdata[ffcv]' && pip install --no-deps ffcv==1.0.2 "
    "(docs/install.md says why --no-deps)"
)
FORMAT_VERSION = 1
SPLITS = ("train", "test")
FIELDS = ("image", "label", "index")
_DECODE_BATCH = 512
_PAGE_SIZE = 1 << 21  # ffcv's smallest page (its default is 4x): less padding in small files
_CHUNK_BYTES = 64 << 20  # content digests hash chunks of this size in parallel threads
_CHUNK_SAMPLES = 256  # samples a writer process takes from the work queue at a time
_RECONVERT = "re-run cycdata convert"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WHOLE_DEFAULT_MAX = 512  # whole images without --max-resolution: the longer side bounded all the same
_CROP_LEVELS = 8  # ffcv's crop magnitude steps (one compiled pipeline per step in use)
_CROP_PCT = 0.875  # timm's evaluation crop, as in datasets.ImageFileDataset

# ffcv 1.0.2's on-disk layout (ffcv/types.py), mirrored here so a bad file is checked with numpy alone,
# before any ffcv code (whose reader trusts the header) touches it.
_FFCV_FILE_VERSION = 2
_HEADER = np.dtype(
    [("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
     ("alloc_table_ptr", "<u8")], align=True)
_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
_ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
_INT_FIELD, _RGB_FIELD, _NDARRAY_FIELD = 1, 2, 4


class BetonError(DatasetError):
    """A ``.beton`` file (or its ``.json``) is missing, foreign, truncated or does not match.

    Example:
        >>> try:
        ...     beton_paths("data.csv")
        ... except BetonError as error:
        ...     print(error)
        beton path must end in .beton, got 'data.csv'; name the files as in: cycdata convert mnist5k m.beton
    """


class FFCVMissingError(ImportError):
    """ffcv is not installed; the message says what to install."""


def require_ffcv() -> Any:
    """Import ffcv, or fail with the one line that says what to install."""
    try:
        import ffcv
        import ffcv.writer
    except ImportError as error:
        raise FFCVMissingError(f"{FFCV_MISSING} ({error})") from error
    return ffcv


# --------------------------------------------------------------------------------------------
# Files and their description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BetonInfo:
    """The ``.json`` beside a converted dataset: enough to build a model and to check the files.

    The file carries a ``checksum`` of its own content (an edited description is refused) and each split
    a ``sha256`` of its ``.beton`` (flipped bytes are refused before training, see :func:`verify_beton`).
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoding: str  # "raw" or "jpeg"
    jpeg_quality: int | None
    splits: dict[str, dict[str, Any]]  # split -> {"samples": N, "bytes": file size, "sha256": content digest}
    source: str = ""
    format: int = FORMAT_VERSION
    variable_size: bool = False  # whole JPEGs of any size (longer side <= image_size), cropped when decoded
    chunk_bytes: int = _CHUNK_BYTES  # the content digest's chunk size

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        return json.dumps({**fields, "checksum": _description_digest(fields)}, indent=2) + "\n"

    @classmethod
    def read(cls, path: Path) -> BetonInfo:
        """Read and check a description; an edited, damaged or foreign one is a :class:`BetonError`."""
        fix = f"{_RECONVERT} (cycdata convert DATASET {path.with_suffix('.beton')})"
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise BetonError(f"{path} is missing; it describes the .beton files beside it. Write all three with: "
                             f"cycdata convert DATASET {path.with_suffix('.beton')}") from None
        except (OSError, ValueError) as error:  # a folder, unreadable, not JSON, not UTF-8
            raise BetonError(f"{path} is not a cycdata beton description ({error}); {fix}") from None
        if not isinstance(raw, dict):
            raise BetonError(f"{path} is not a cycdata beton description (a JSON {type(raw).__name__}); {fix}")
        digest = raw.pop("checksum", None)
        if digest is None:
            warnings.warn(f"{path} has no checksum (written by an older cycdata): damaged files cannot be detected; "
                          f"{fix} to add one", UnverifiedBetonWarning, stacklevel=3)
        elif digest != _description_digest(raw):
            raise BetonError(f"{path} was edited or damaged (its checksum does not match its content); {fix}")
        problem = _description_problem(raw)
        if problem:
            raise BetonError(f"{path} is not a cycdata beton description ({problem}); {fix}")
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        return cls(**raw)


def _description_digest(fields: dict[str, Any]) -> str:
    """sha256 of a description's fields in canonical JSON (key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _description_problem(raw: dict[str, Any]) -> str | None:
    """What is wrong with a description's fields (an old, unchecksummed one may be hand-edited), or None."""
    def whole(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    known = {field.name for field in dataclasses.fields(BetonInfo)}
    if set(raw) - known or {"name", "num_classes", "in_chans", "image_size", "mean", "std", "encoding",
                            "jpeg_quality", "splits"} - set(raw):
        return f"fields {sorted(raw)}, expected {sorted(known)}"
    if raw.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        return f"format {raw['format']!r}, this cycdata reads {FORMAT_VERSION}"
    if not (whole(raw["num_classes"], 1) and raw["in_chans"] in (1, 3) and whole(raw["image_size"], 1)):
        return "num_classes, in_chans and image_size must be positive integers (in_chans 1 or 3)"
    for key in ("mean", "std"):
        value = raw[key]
        if not (isinstance(value, list) and len(value) == raw["in_chans"]
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == v for v in value)):
            return f"{key} must be {raw['in_chans']} numbers"
    if raw["encoding"] not in ("raw", "jpeg") or not (raw["jpeg_quality"] is None or whole(raw["jpeg_quality"], 1)):
        return "encoding must be raw or jpeg, jpeg_quality null or an integer"
    splits = raw["splits"]
    if not isinstance(splits, dict) or sorted(splits) != sorted(SPLITS) or not all(
            isinstance(s, dict) and whole(s.get("samples"), 0) and whole(s.get("bytes"), 0) for s in splits.values()):
        return f"splits must map {list(SPLITS)} to their samples and bytes"
    variable = raw.get("variable_size", False)
    if not isinstance(variable, bool) or (variable and raw["encoding"] != "jpeg"):
        return "variable_size must be true or false (true only with jpeg encoding)"
    if not whole(raw.get("chunk_bytes", _CHUNK_BYTES), 1):
        return "chunk_bytes must be a positive integer"
    return None


class UnverifiedBetonWarning(UserWarning):
    """A ``.beton`` description without checksums (an older conversion): damage cannot be detected."""


def beton_digest(path: str | os.PathLike[str], chunk_bytes: int = _CHUNK_BYTES) -> str:
    """A file's content digest: sha256 over the sha256 of each ``chunk_bytes`` chunk.

    The chunks are hashed in parallel threads (hashlib releases the GIL on large buffers), so a big
    file is checked at several times one core's hashing speed.

    Example:
        >>> import tempfile, pathlib
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = file.write_bytes(b"abc")
        >>> beton_digest(file)[:16]
        '4f8b42c22dd3729b'
    """
    size = Path(path).stat().st_size
    starts = range(0, max(size, 1), chunk_bytes)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        def chunk_digest(start: int) -> bytes:
            return hashlib.sha256(os.pread(descriptor, chunk_bytes, start)).digest()

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return hashlib.sha256(b"".join(pool.map(chunk_digest, starts))).hexdigest()
    finally:
        os.close(descriptor)


def verify_beton(path: str | os.PathLike[str], info: BetonInfo, split: str) -> None:
    """Refuse a split file whose content differs from the digest its description recorded at conversion.

    Descriptions from before checksums carry none; :meth:`BetonInfo.read` has warned about those already.
    """
    expected = info.splits[split].get("sha256")
    if expected is not None and beton_digest(path, info.chunk_bytes) != expected:
        raise BetonError(f"{path} is damaged: its content does not match the checksum written at conversion "
                         f"(flipped or overwritten bytes); {_RECONVERT} (cycdata convert DATASET "
                         f"{Path(path).with_suffix('').with_suffix('.beton')})")


def beton_paths(path: str | os.PathLike[str]) -> dict[str, Path]:
    """The files of a converted dataset: ``{"train": .., "test": .., "info": ..}`` from ``NAME.beton``.

    Example:
        >>> {key: str(value) for key, value in beton_paths("data/m.beton").items()}
        {'train': 'data/m.train.beton', 'test': 'data/m.test.beton', 'info': 'data/m.json'}
    """
    path = Path(path)
    if path.suffix != ".beton":
        raise BetonError(f"beton path must end in .beton, got {str(path)!r}; "
                         "name the files as in: cycdata convert mnist5k m.beton")
    stem = path.with_suffix("")
    if stem.suffix in (".train", ".test"):  # the user named one split's file: use the pair
        stem = stem.with_suffix("")
    return {"train": stem.with_suffix(".train.beton"), "test": stem.with_suffix(".test.beton"),
            "info": stem.with_suffix(".json")}


def check_beton(path: str | os.PathLike[str], expected_samples: int | None = None,
                expected_bytes: int | None = None) -> dict[str, Any]:
    """Check an ffcv file's structure with numpy alone; returns its fields by name.

    ffcv's reader trusts the header: a truncated file or one that is not a .beton can crash the
    process in compiled code. Everything it will dereference is checked here first.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "x.train.beton"
        >>> _ = bad.write_bytes(b"not ffcv at all" * 10)
        >>> try:
        ...     check_beton(bad)
        ... except BetonError as error:
        ...     print(str(error).split(" is ")[1].split(";")[0])
        not an ffcv 1.0 file (header version 28526, expected 2)
    """
    path = Path(path)
    if not path.is_file():
        raise BetonError(f"{path} does not exist; write it with cycdata convert")
    size = path.stat().st_size
    fix = "rewrite it with cycdata convert"
    if expected_bytes is not None and size != expected_bytes:
        raise BetonError(f"{path} has {size} bytes, its .json says {expected_bytes}: the file is truncated or was "
                         f"replaced; {fix}")
    if size < _HEADER.itemsize:
        raise BetonError(f"{path} is too short to be an ffcv file ({size} bytes); {fix}")
    header = np.fromfile(path, dtype=_HEADER, count=1)[0]
    if int(header["version"]) != _FFCV_FILE_VERSION:
        raise BetonError(f"{path} is not an ffcv 1.0 file (header version {int(header['version'])}, expected "
                         f"{_FFCV_FILE_VERSION}); {fix}")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    descriptors_end = _HEADER.itemsize + num_fields * _FIELD_DESC.itemsize
    if not 0 < num_fields <= 64 or descriptors_end > size:
        raise BetonError(f"{path} has a damaged header ({num_fields} fields in {size} bytes); {fix}")
    descriptors = np.fromfile(path, dtype=_FIELD_DESC, count=num_fields, offset=_HEADER.itemsize)
    names = [bytes(d["name"]).rstrip(b"\0").decode("ascii", "replace") for d in descriptors]
    fields = dict(zip(names, (int(d["type_id"]) for d in descriptors)))
    missing = [name for name in FIELDS if name not in fields]
    if missing:
        raise BetonError(f"{path} has fields {names}, not {list(FIELDS)} (missing {missing}): it was not written by "
                         f"cycdata convert, which adds the 'index' field that maps losses back to samples; {fix}")
    if fields["image"] not in (_RGB_FIELD, _NDARRAY_FIELD) or fields["label"] != _INT_FIELD or \
            fields["index"] != _INT_FIELD:
        raise BetonError(f"{path}: unexpected field types {fields}; {fix}")
    if expected_samples is not None and num_samples != expected_samples:
        raise BetonError(f"{path} holds {num_samples} samples, its .json says {expected_samples}; {fix}")
    metadata_type = _metadata_type(list(fields.values()))
    data_start = descriptors_end + num_samples * metadata_type.itemsize
    table = int(header["alloc_table_ptr"])
    if not data_start <= table <= size or (size - table) % _ALLOC_ENTRY.itemsize:
        raise BetonError(f"{path} is truncated or damaged (allocation table at {table}, file size {size}); {fix}")
    metadata = np.fromfile(path, dtype=metadata_type, count=num_samples, offset=descriptors_end)
    image_column = metadata[f"f{names.index('image')}"]
    pointers = image_column["data_ptr"] if fields["image"] == _RGB_FIELD else image_column
    if num_samples and (int(pointers.min()) < data_start or int(pointers.max()) >= table):
        raise BetonError(f"{path} is damaged: image data points outside the file's data region; {fix}")
    index_column = metadata[f"f{names.index('index')}"]
    if num_samples and not np.array_equal(np.sort(index_column), np.arange(num_samples)):
        raise BetonError(f"{path}: its 'index' field is not a permutation of 0..{num_samples - 1}; {fix}")
    return {"samples": num_samples, "bytes": size, "fields": fields, "labels": metadata[f"f{names.index('label')}"],
            "indices": index_column}


def _metadata_type(type_ids: Sequence[int]) -> np.dtype:
    parts = {_INT_FIELD: np.dtype("<i8"), _NDARRAY_FIELD: np.dtype("<u8"),
             _RGB_FIELD: np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])}
    return np.dtype([("", parts[type_id]) for type_id in type_ids], align=True)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class _SampleError(Exception):
    """A sample the writer could not read; its message names the sample (and its file)."""


class _WritableSplit:
    """Items ``(image array, label, index)`` as ffcv's writer wants them (HWC RGB for JPEG)."""

    def __init__(self, dataset: Dataset, image_size: int, jpeg: bool, split: str) -> None:
        self.dataset, self.image_size, self.jpeg, self.split = dataset, image_size, jpeg, split

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        try:
            image, label = self.dataset[index][:2]
        except Exception as error:  # raised in a writer process: it travels to the main process as one line
            raise _SampleError(f"cannot read {self.split} sample {index}{_sample_file(self.dataset, index, error)}: "
                               f"{error}; fix or remove it, then {_RECONVERT}") from None
        if image.shape[-1] != self.image_size:
            image = F.interpolate(image[None].float(), size=(self.image_size, self.image_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if self.jpeg:
            pixels = image.permute(1, 2, 0)
            if pixels.shape[-1] == 1:
                pixels = pixels.expand(-1, -1, 3)
            return np.ascontiguousarray(pixels.numpy()), int(label), index
        return np.ascontiguousarray(image.numpy()), int(label), index


class _WholeImages(_WritableSplit):
    """Items of an image-file dataset as whole RGB images (HWC), the longer side shrunk to ``image_size`` at most
    (PIL, antialiased): what ffcv's crop decoders read back at any size."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        from PIL import Image

        path, label = self.dataset.samples[index]  # type: ignore[attr-defined]
        try:
            with Image.open(path) as opened:
                width, height = opened.size
                shrink = max(width, height) / self.image_size
                if shrink >= 2:  # a JPEG decodes at a reduced DCT scale (never below the target)
                    opened.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
                image = opened.convert("RGB")
            if max(image.size) > self.image_size:
                ratio = self.image_size / max(image.size)
                image = image.resize((max(1, round(image.size[0] * ratio)), max(1, round(image.size[1] * ratio))),
                                     Image.Resampling.BILINEAR)
        except Exception as error:  # raised in a writer process: it travels to the main process as one line
            raise _SampleError(f"cannot read {self.split} sample {index} ({path}): {' '.join(str(error).split())}; "
                               f"fix or remove it, then {_RECONVERT}") from None
        return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)), int(label), index


def _sample_file(dataset: Dataset, index: int, error: Exception) -> str:
    """`` (PATH)`` for datasets of files (``samples`` of ``(path, label)``) when the error does not name it."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and 0 <= index < len(samples) and str(samples[index][0]) not in str(error):
        return f" ({samples[index][0]})"
    return ""


def convert(dataset: str | DatasetSplits, out: str | os.PathLike[str], *, jpeg_quality: int | None = None,
            max_resolution: int | None = None, overwrite: bool = False, progress: bool = True,
            num_workers: int | None = None) -> BetonInfo:
    """Write a dataset's train and test splits to ``.beton`` files beside ``out`` (see the module docstring).

    Nothing is replaced until both splits are written: a sample that cannot be read, a writer process
    that dies or an interruption stops the conversion with a :class:`BetonError` naming the cause,
    ends the writer processes and removes the ``.partial`` files (existing files stay as they were).

    Args:
        dataset: a spec :func:`cycdata.loaders.load_dataset` understands, or loaded splits.
        out: ``NAME.beton``; ``NAME.train.beton``, ``NAME.test.beton`` and ``NAME.json`` are written.
        jpeg_quality: store JPEG at this quality (1..100) instead of raw pixels (smaller, slower to read;
            1-channel images are stored as gray RGB and read back as 1 channel).
        max_resolution: shrink images whose side is larger than this (bilinear, antialiased). An image-file
            dataset (``folder:PATH``) with ``jpeg_quality`` is stored whole instead (ImageNet-style): each
            image keeps its aspect ratio, its longer side shrunk to ``max_resolution`` at most, and is cropped to
            the run's image size when read.
        overwrite: replace existing files (otherwise existing files are an error, and nothing is written).
        progress: show ffcv's progress bar.
        num_workers: writer processes (default: the CPU count, at most 8).

    Returns:
        The description written to ``NAME.json``.
    """
    ffcv = require_ffcv()
    from ffcv.fields import IntField, NDArrayField, RGBImageField

    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or not 1 <= int(jpeg_quality) <= 100):
        raise BetonError(f"--jpeg quality must be an integer in 1..100, got {jpeg_quality!r}")
    if max_resolution is not None and int(max_resolution) < 1:
        raise BetonError(f"--max-resolution must be a positive integer, got {max_resolution!r}")
    if num_workers is not None and (isinstance(num_workers, bool) or int(num_workers) < 1):
        raise BetonError(f"--workers must be a positive integer, got {num_workers!r}")
    paths = beton_paths(out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise BetonError(f"{', '.join(existing)} already exist; choose another name or pass --overwrite")
    splits = load_dataset(dataset) if isinstance(dataset, str) else dataset
    size = splits.image_size if max_resolution is None else min(splits.image_size, int(max_resolution))
    jpeg = jpeg_quality is not None
    whole = jpeg and all(isinstance(getattr(splits, split), ImageFileDataset) for split in SPLITS)
    if whole:
        size = int(max_resolution) if max_resolution is not None else _WHOLE_DEFAULT_MAX
    image_field = (RGBImageField(write_mode="jpg", jpeg_quality=int(jpeg_quality)) if jpeg
                   else NDArrayField(np.dtype("uint8"), (splits.in_chans, size, size)))
    writable = _WholeImages if whole else _WritableSplit
    # Each writer process fills pages of its own: few processes and small pages keep small datasets small.
    workers = num_workers or max(1, min(8, os.cpu_count() or 1, len(splits.train) // 2000))
    paths["info"].parent.mkdir(parents=True, exist_ok=True)
    # Both splits are written beside their names and renamed only when both are complete.
    partial = {key: path.with_name(path.name + ".partial") for key, path in paths.items()}
    written: dict[str, dict[str, Any]] = {}
    try:
        for split in SPLITS:
            part = getattr(splits, split)
            writer = ffcv.writer.DatasetWriter(str(partial[split]), {"image": image_field, "label": IntField(),
                                                                     "index": IntField()}, num_workers=workers,
                                               page_size=_PAGE_SIZE)
            if progress:
                print(f"writing {split}: {len(part)} images -> {paths[split]}", flush=True)
            _write_watched(writer, writable(part, size, jpeg, split), progress)
            written[split] = {"samples": len(part), "bytes": partial[split].stat().st_size,
                              "sha256": beton_digest(partial[split])}
        info = BetonInfo(name=splits.name, num_classes=splits.num_classes, in_chans=splits.in_chans,
                         image_size=size, mean=tuple(splits.mean), std=tuple(splits.std),
                         encoding="jpeg" if jpeg else "raw", jpeg_quality=int(jpeg_quality) if jpeg else None,
                         splits=written, source=dataset if isinstance(dataset, str) else splits.name,
                         variable_size=whole)
        partial["info"].write_text(info.to_json())
        for key in (*SPLITS, "info"):  # the description last: it vouches for the files beside it
            os.replace(partial[key], paths[key])
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return info


# ffcv 1.0.2's DatasetWriter waits for a sample count its workers never reach when one of them dies (a
# truncated image hangs the conversion forever), and its workers outlive a killed parent. The loop below
# is its _write_common with the workers watched: the first failure ends them all and is raised in one line.


def _write_watched(writer: Any, dataset: _WritableSplit, progress: bool) -> None:
    """Write ``dataset`` with ``writer``'s layout; raise :class:`BetonError` when a writer process fails."""
    from ffcv.writer import MemoryAllocator, chunks, worker_job_indexed_dataset
    from tqdm import tqdm

    total = len(dataset)
    writer.num_samples = total
    writer.prepare()
    context = multiprocessing.get_context()
    work, allocations, errors = context.Queue(), context.Queue(), context.Queue()
    for chunk in chunks(list(enumerate(range(total))), _CHUNK_SAMPLES):
        work.put(chunk)
    for _ in range(writer.num_workers):
        work.put(None)  # one stop token per worker
    done = context.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    job = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations, dataset)
    processes = [context.Process(target=_writer_process, args=(os.getpid(), errors, worker_job_indexed_dataset, *job),
                                 daemon=True) for _ in range(writer.num_workers)]
    try:
        for process in processes:
            process.start()
        with tqdm(total=total, disable=not progress) as bar:
            while done.value < total:
                _raise_on_writer_failure(processes, errors)
                bar.update(done.value - bar.n)
                time.sleep(0.05)
            bar.update(total - bar.n)
        table: list[Any] = []
        while len(table) < len(processes):  # each worker sends its page allocations when it is done
            try:
                table.append(allocations.get(timeout=0.1))
            except queue.Empty:
                _raise_on_writer_failure(processes, errors)
        writer.finalize([entry for entries in table for entry in entries])
    finally:
        for process in processes:
            if process.pid is not None:
                if process.is_alive():
                    process.kill()
                process.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def _writer_process(parent: int, errors: Any, job: Any, *args: Any) -> None:
    """A writer process: dies with its parent, reports its failure as one line instead of a traceback."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent ends us, quietly
    try:
        job(*args)
    except Exception as error:
        errors.put(str(error) if isinstance(error, _SampleError) else f"{type(error).__name__}: {error}")
        errors.close()
        errors.join_thread()  # the message is in the pipe before this process exits
        raise SystemExit(1) from None


def _die_with_parent(parent: int) -> None:
    """Ask Linux to kill this process when its parent dies, even by SIGKILL (no orphaned writers)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):  # no prctl in this libc: the parent's cleanup still ends us
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _raise_on_writer_failure(processes: Sequence[Any], errors: Any) -> None:
    failed = [process for process in processes if process.exitcode not in (None, 0)]
    if not failed:
        return
    try:
        message = errors.get(timeout=1.0)
    except queue.Empty:
        code = failed[0].exitcode
        cause = f"signal {-code}, out of memory?" if code < 0 else f"exit status {code}"
        message = f"an ffcv writer process died ({cause}); {_RECONVERT}"
    raise BetonError(message)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def crop_ranges(magnitude: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """ffcv's ``(scale, ratio)`` for a random-resized crop at ``magnitude``: from the evaluation crop's area
    (0.875², ratio 1) at 0 to timm's ``(0.08, 1)`` and ``(3/4, 4/3)`` at 1 (see the module docstring).

    Example:
        >>> crop_ranges(1.0)
        ((0.08, 1.0), (0.75, 1.3333333333333333))
    """
    from cycdata.augment_ladder.ops import RRC_RATIO, RRC_SCALE

    base = _CROP_PCT**2
    scale = ((1 - magnitude) * base + magnitude * RRC_SCALE[0], (1 - magnitude) * base + magnitude * RRC_SCALE[1])
    return scale, (RRC_RATIO[0] ** magnitude, RRC_RATIO[1] ** magnitude)


def _image_pipeline(info: BetonInfo, device: torch.device | None, image_size: int | None = None,
                    crop: float = 0.0) -> list[Any]:
    from ffcv.fields.decoders import NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.transforms import ToDevice, ToTensor, ToTorchImage

    if info.variable_size:
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder

        side = (image_size or info.image_size,) * 2
        if crop > 0:
            scale, ratio = crop_ranges(crop)
            decoder: Any = RandomResizedCropRGBImageDecoder(side, scale=scale, ratio=ratio)
        else:
            decoder = CenterCropRGBImageDecoder(side, ratio=_CROP_PCT)
        pipeline = [decoder, ToTensor(), ToTorchImage(channels_last=False)]
    elif info.encoding == "jpeg":
        pipeline = [SimpleRGBImageDecoder(), ToTensor(), ToTorchImage(channels_last=False)]
    else:
        pipeline = [NDArrayDecoder(), ToTensor()]
    if device is not None and device.type != "cpu":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


def _int_pipeline(device: torch.device | None) -> list[Any]:
    from ffcv.fields.decoders import IntDecoder
    from ffcv.transforms import ToDevice, ToTensor

    pipeline = [IntDecoder(), ToTensor()]
    if device is not None and device.type != "cpu":
        pipeline.append(ToDevice(device, non_blocking=True))
    return pipeline


class BetonDataset(Dataset[tuple[Tensor, int]]):
    """One split of a converted dataset: checked when opened (structure and checksum), labels read without
    decoding images.

    Items are ``(uint8 [C, H, W] image, int label)`` like every other cycdata dataset; random access
    decodes the whole split once (ffcv reads files in batches). :class:`cycdata.loaders.CyclicalLoader`
    reads it through ffcv directly.

    Args:
        path: ``NAME.beton`` (or one of its split files).
        split: ``train`` or ``test``.
        image_size: the side images are decoded at; only for variable-size files (``cycdata convert
            folder:PATH ... --jpeg Q``), which are centre-cropped to it (default: the files' longest side).
    """

    def __init__(self, path: str | os.PathLike[str], split: str = "train", image_size: int | None = None) -> None:
        require_ffcv()
        if split not in SPLITS:
            raise BetonError(f"split must be one of {SPLITS}, got {split!r}")
        self.paths = beton_paths(path)
        self.split = split
        self.file = self.paths[split]
        self.info = BetonInfo.read(self.paths["info"])
        if image_size is not None and image_size != self.info.image_size and not self.info.variable_size:
            raise BetonError(f"{self.paths['train'].with_suffix('').with_suffix('.beton')} holds "
                             f"{self.info.image_size}x{self.info.image_size} images, image_size {image_size} asks for "
                             "another size; use image_size null, or convert the folder whole (cycdata convert "
                             "folder:PATH OUT.beton --jpeg 90 --max-resolution 256) to read it at any size")
        self.image_size = image_size or self.info.image_size
        expected = self.info.splits.get(split, {})
        checked = check_beton(self.file, expected.get("samples"), expected.get("bytes"))
        verify_beton(self.file, self.info, split)  # the structure can be intact around damaged pixels
        # Labels in sample order, from the file's metadata table (no image is decoded for them).
        labels = np.empty(checked["samples"], dtype=np.int64)
        labels[checked["indices"]] = checked["labels"]
        self.labels = torch.from_numpy(labels)
        self._decoded: TensorImageDataset | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.decoded()[index]

    @property
    def image_bytes(self) -> int:
        """Bytes of the decoded split as a uint8 tensor."""
        return len(self) * self.info.in_chans * self.image_size**2

    def decoded(self) -> TensorImageDataset:
        """The whole split decoded once into memory, in sample order."""
        if self._decoded is None:
            images = torch.empty(len(self), self.info.in_chans, self.image_size, self.image_size, dtype=torch.uint8)
            loader = open_ffcv_loader(self, batch_size=_DECODE_BATCH, order=np.arange(len(self)), num_workers=None)
            for batch_images, _, batch_indices in _read_epoch(loader, self.info):
                images[batch_indices] = batch_images
            self._decoded = TensorImageDataset(images, self.labels.clone())
        return self._decoded


def load_beton(path: str | os.PathLike[str], image_size: int | None = None) -> DatasetSplits:
    """``beton:PATH`` for :func:`cycdata.loaders.load_dataset`: both splits of a converted dataset, at
    ``image_size`` for variable-size files (a fixed-size file refuses another size)."""
    train, test = BetonDataset(path, "train", image_size), BetonDataset(path, "test", image_size)
    info = train.info
    return DatasetSplits(name=info.name, train=train, test=test, num_classes=info.num_classes,
                         in_chans=info.in_chans, image_size=train.image_size, mean=info.mean, std=info.std)


class _OurOrder:
    """An ffcv traversal order that returns whatever the batch sampler chose for the epoch."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.current = np.zeros(0, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.current


def open_ffcv_loader(dataset: BetonDataset, *, batch_size: int, order: np.ndarray, num_workers: int | None,
                     device: torch.device | None = None, crop: float = 0.0) -> Any:
    """An ffcv ``Loader`` over ``dataset`` whose order and batch size we set before each epoch (``crop``: the
    random-resized crop magnitude of a variable-size file, 0 for the centre crop)."""
    require_ffcv()
    from ffcv.loader import Loader, OrderOption

    threads = torch.get_num_threads()
    loader = Loader(str(dataset.file), batch_size=batch_size, num_workers=num_workers or min(8, os.cpu_count() or 1),
                    os_cache=True, order=OrderOption.SEQUENTIAL, drop_last=False, seed=0,
                    pipelines={"image": _image_pipeline(dataset.info, device, dataset.image_size, crop),
                               "label": _int_pipeline(device),
                               "index": _int_pipeline(device)})
    torch.set_num_threads(threads)  # ffcv sets torch's thread count to its own; training keeps ours
    # ffcv 1.0.2 rejects a custom order passed as order= (SETUP.md): swap ours in after construction.
    loader.traversal_order = _OurOrder(loader)
    _set_epoch_order(loader, order, batch_size)
    return loader


def _set_epoch_order(loader: Any, order: np.ndarray, batch_size: int) -> None:
    loader.traversal_order.current = order
    # len(loader) and the per-epoch cut use first_traversal_order: without this a list longer than
    # the first epoch's would be silently truncated.
    loader.first_traversal_order = order
    loader.batch_size = batch_size


def _read_epoch(loader: Any, info: BetonInfo) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Decoded batches ``(images, labels, indices)``, cloned (ffcv reuses its output buffers)."""
    threads = torch.get_num_threads()
    iterator = iter(loader)
    torch.set_num_threads(threads)
    for images, labels, indices in iterator:
        if info.encoding == "jpeg" and info.in_chans == 1:
            images = images[:, :1]
        yield images.clone(), labels.reshape(-1).long(), indices.reshape(-1).long()


class FFCVSource:
    """Reads the batches a batch sampler chose, through ffcv, one epoch at a time.

    The epoch's batches are laid end to end as ffcv's traversal order, decoded in chunks of the
    epoch's batch size, and cut back into the sampler's batches (which may differ in size, as in
    semi-supervised mode). The ``index`` field comes back with every sample; a mismatch with the
    sampler's choice would mean a broken order and raises. A variable-size file is cropped while
    decoding, each batch at its own crop magnitude (consecutive batches of one magnitude step share a
    traversal; the two most recent steps keep their compiled ffcv loaders).

    Args:
        dataset: the split to read.
        num_workers: ffcv's decoding threads (default: the CPU count, at most 8).
        device: where ffcv puts the batches (``ToDevice``); CPU by default.
    """

    def __init__(self, dataset: BetonDataset, *, num_workers: int | None = None,
                 device: torch.device | str | None = None) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.device = None if device is None else torch.device(device)
        self._loaders: dict[float, Any] = {}  # crop step -> ffcv loader, most recently used last
        self._loader: Any = None  # the loader of the latest run

    @property
    def crops(self) -> bool:
        """Whether this source crops while decoding (a variable-size file)."""
        return bool(self.dataset.info.variable_size)

    def epoch(self, batches: Sequence[Sequence[int] | Tensor],
              crops: Sequence[float] | None = None) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(images, labels, indices)`` for ``batches`` (lists or int64 tensors of indices), in order;
        ``crops``: each batch's random-resized crop magnitude (variable-size files; default 0, the centre crop)."""
        if not batches:
            return
        levels = [0.0] * len(batches) if crops is None or not self.crops else [
            round(float(crop) * _CROP_LEVELS) / _CROP_LEVELS for crop in crops]
        start = 0
        while start < len(batches):  # runs of batches at one crop step
            stop = start
            while stop < len(batches) and levels[stop] == levels[start]:
                stop += 1
            yield from self._run(batches[start:stop], levels[start])
            start = stop

    def _loader_for(self, crop: float, chunk: int, order: np.ndarray) -> Any:
        loader = self._loaders.pop(crop, None)
        if loader is None:
            loader = open_ffcv_loader(self.dataset, batch_size=chunk, order=order, num_workers=self.num_workers,
                                      device=self.device, crop=crop)
        else:
            _set_epoch_order(loader, order, chunk)
        self._loaders[crop] = self._loader = loader
        while len(self._loaders) > 2:  # each holds pinned decode buffers: keep the steps in use
            self._loaders.pop(next(iter(self._loaders)))
        return loader

    def _run(self, batches: Sequence[Sequence[int] | Tensor], crop: float) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        lengths = [len(batch) for batch in batches]
        chunk = max(set(lengths), key=lengths.count)  # the epoch's batch size
        order = torch.cat([torch.as_tensor(batch, dtype=torch.long) for batch in batches]).numpy().astype(np.uint64)
        loader = self._loader_for(crop, chunk, order)
        pieces: list[tuple[Tensor, Tensor, Tensor]] = []  # decoded samples not yet handed out (a few chunks)
        decoded = _read_epoch(loader, self.dataset.info)
        for length, wanted in zip(lengths, batches):
            while sum(len(piece[2]) for piece in pieces) < length:
                pieces.append(next(decoded))
            batch, pieces = _cut(pieces, length)
            if not torch.equal(batch[2].cpu(), torch.as_tensor(wanted, dtype=torch.long).cpu()):
                raise RuntimeError("ffcv returned samples in a different order than the batch sampler chose; "
                                   "this ffcv version's traversal-order internals differ from 1.0.2's")
            yield batch
        for _ in decoded:  # let ffcv's epoch thread finish cleanly
            pass


def _cut(pieces: list[tuple[Tensor, Tensor, Tensor]],
         length: int) -> tuple[tuple[Tensor, Tensor, Tensor], list[tuple[Tensor, Tensor, Tensor]]]:
    """The first ``length`` samples of the decoded pieces, and what is left over."""
    if len(pieces) == 1 and len(pieces[0][2]) == length:  # the common case: one ffcv batch is one of ours
        return pieces[0], []
    joined = tuple(torch.cat([piece[k] for piece in pieces]) for k in range(3))
    head = tuple(part[:length] for part in joined)
    rest = tuple(part[length:] for part in joined)
    return head, ([rest] if len(rest[2]) else [])  # type: ignore[return-value]

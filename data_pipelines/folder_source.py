"""Raw samples (see samples.py) from local files, as grain MapDatasets whose images are read on access.

    folder_samples(root)   root/**/x.jpg with its caption in x.txt beside it (an image without one has no caption)
    csv_samples(csv_path)  a CSV/TSV with a header naming an image-path column and a caption column (open_clip's)

Each sample also carries "path", the image file it was read from.
"""

from __future__ import annotations

import csv
import os

import grain

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def load_record(record: dict) -> dict:
    """A listed record -> raw sample: reads the image bytes and, if the record names one, the caption file."""
    sample = {name: value for name, value in record.items() if name != "caption_file"}
    with open(record["path"], "rb") as f:
        sample["image"] = f.read()
    if "caption_file" in record:
        with open(record["caption_file"], encoding="utf-8") as f:
            sample["caption"] = f.read().strip()
    return sample


def folder_classes(root: str) -> list[str]:
    """Class names for a root/<class>/<image> layout: the sorted names of root's subdirectories."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def folder_samples(root: str, labels_from_dirs: bool = False) -> grain.MapDataset:
    """Every image under root (recursively) in key order; key = path relative to root without extension.

    With labels_from_dirs, "label" is the index of the image's top-level directory in folder_classes(root).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = {name: index for index, name in enumerate(folder_classes(root))} if labels_from_dirs else None
    records = []
    for directory, _, filenames in os.walk(root):
        names = set(filenames)
        for name in filenames:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            key = os.path.relpath(os.path.join(directory, stem), root).replace(os.sep, "/")
            record = {"__key__": key, "__source__": root, "path": os.path.join(directory, name)}
            if f"{stem}.txt" in names:
                record["caption_file"] = os.path.join(directory, f"{stem}.txt")
            if classes is not None:
                if "/" not in key:
                    raise ValueError(f"image {record['path']} is not in a class folder (labels_from_dirs expects "
                                     f"root/<class>/<image>)")
                record["label"] = classes[key.split("/", 1)[0]]
            records.append(record)
    if not records:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    records.sort(key=lambda record: (record["__key__"], record["path"]))
    for first, second in zip(records, records[1:]):
        if first["__key__"] == second["__key__"]:
            raise ValueError(f"images {first['path']} and {second['path']} share the key {first['__key__']!r}")
    return grain.MapDataset.source(records).map(load_record)


def csv_samples(csv_path: str, image_key: str = "filepath", caption_key: str = "caption",
                separator: str | None = None) -> grain.MapDataset:
    """One sample per row in file order; key = 9-digit row index; relative paths are from the CSV's folder.

    The separator defaults to a tab for a .tsv file and a comma otherwise. Fails if any listed image is missing.
    """
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    if separator is None:
        separator = "\t" if csv_path.lower().endswith(".tsv") else ","
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=separator)
        columns = reader.fieldnames or []
        for column in (image_key, caption_key):
            if column not in columns:
                raise ValueError(f"{csv_path} has no column {column!r} (columns: {', '.join(columns)})")
        rows = [(row[image_key] or "", row[caption_key] or "") for row in reader]
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    folder = os.path.dirname(csv_path)
    records = [{"__key__": f"{index:09d}", "__source__": csv_path, "path": os.path.join(folder, path),
                "caption": caption} for index, (path, caption) in enumerate(rows)]
    missing = [record["path"] for record in records if not os.path.isfile(record["path"])]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(records)} images listed in {csv_path} are missing, "
                                f"first: {missing[0]}")
    return grain.MapDataset.source(records).map(load_record)

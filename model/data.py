"""Datasets, cleaning, packing into token windows, and the on-disk caches.

Every split becomes an int32 array of windows [N, seq_len + 1]: inputs are
`w[:, :-1]`, targets `w[:, 1:]`. Packing joins documents with the end-of-text
token and cuts the stream with a stride of seq_len, so every token is a
target exactly once; `pack=False` keeps the study's truncate-and-pad windows.
Padding is PAD_ID (-1), which the model masks and the loss ignores.

`datasets` (Hugging Face) is imported only to download from the Hub: a mirror or a local file never needs it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError, DataConfig
from .paths import cache_dir, data_mirror
from .tokenizers import (
    TextTokenizer,
    bpe_vocab_size,
    check_tokenizer_spec,
    hub_reachable,
    load_tokenizer,
    synthetic_tokenizer,
)
from .transformer import PAD_ID

CACHE_FORMAT = 1  # bump when the window layout changes


@dataclass(frozen=True)
class HubDataset:
    """Where a named dataset lives on the Hugging Face Hub."""

    path: str
    name: str | None
    splits: tuple[str, ...]


HUB_DATASETS = {
    "imdb": HubDataset("stanfordnlp/imdb", None, ("train", "test")),
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", ("train", "validation", "test")),
    "wikitext-2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", ("train", "validation", "test")),
}
SYNTHETIC = "repeat"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
REPEAT_WINDOWS = {"train": 1 << 17, "test": 2048}
REPEAT_SEEDS = {"train": 1, "validation": 2, "test": 3}
REPEAT_CHUNK_ROWS = 8192


def check_dataset(cfg: DataConfig) -> None:
    """Fail fast on a dataset name or path that cannot be resolved."""
    if cfg.dataset in HUB_DATASETS or cfg.dataset == SYNTHETIC:
        return
    if not Path(cfg.dataset).expanduser().exists():
        if "/" in cfg.dataset or Path(cfg.dataset).suffix in (".parquet", ".jsonl", ".json", ".txt"):
            raise ConfigError(f"dataset path {cfg.dataset!r} does not exist; give an existing parquet / jsonl / txt "
                              "file or folder, or one of imdb, wikitext, wikitext-2, repeat")
        raise ConfigError(
            f"unknown dataset {cfg.dataset!r}: use imdb, wikitext, wikitext-2, repeat, "
            "or a path to a parquet / jsonl / txt file or folder"
        )


def check_data(cfg: DataConfig) -> None:
    """Everything about the data that can be checked without reading it: the dataset,
    its train and test splits, and the tokenizer spec. Sweeps call it before Ray starts."""
    check_dataset(cfg)
    for split in (cfg.train_split, cfg.test_split):
        check_split(cfg, split)
    if cfg.dataset != SYNTHETIC:
        check_tokenizer_spec(cfg.tokenizer)


def check_split(cfg: DataConfig, split: str) -> None:
    if cfg.dataset == SYNTHETIC:
        if split not in REPEAT_SEEDS:
            raise ConfigError(f"the repeat task has no split {split!r}; splits: {', '.join(REPEAT_SEEDS)}")
    elif cfg.dataset in HUB_DATASETS:
        if data_mirror() is not None:
            _mirror_split(cfg.dataset, split)
        elif split not in HUB_DATASETS[cfg.dataset].splits:
            source = HUB_DATASETS[cfg.dataset]
            raise ConfigError(f"{source.path} has no split {split!r}; splits: {', '.join(source.splits)}")
    else:
        root = Path(cfg.dataset).expanduser()
        if _has_named_splits(root) and not any(p.suffix in LOCAL_SUFFIXES for p in root.glob(f"{split}.*")):
            present = sorted({p.stem for p in root.iterdir() if p.suffix in LOCAL_SUFFIXES})
            raise ConfigError(
                f"{root} has no {split}.* file; splits there: {', '.join(present)}; choose with --train-split / "
                "--test-split"
            )


def _mirror_split(dataset: str, split: str) -> Path:
    """The mirror's parquet file of a split; ConfigError naming the splits there when it is missing."""
    mirror = data_mirror()
    path = mirror / dataset / f"{split}.parquet"
    if not path.is_file():
        present = sorted(p.stem for p in (mirror / dataset).glob("*.parquet"))
        raise ConfigError(
            f"split {split!r} of {dataset} is not in SWEEP_DATA_DIR ({path} missing); "
            f"splits there: {', '.join(present) or 'none'}; choose with --train-split / --test-split"
        )
    return path


# ---------------------------------------------------------------- loading text


def clean_text(text: str) -> str:
    """The study's cleaning: lowercase and strip HTML line breaks."""
    return re.sub(r"<br\s*/?>", " ", text).lower()


def load_texts(cfg: DataConfig, split: str) -> list[str]:
    """Documents of one split, cleaned if asked, empty ones dropped."""
    check_dataset(cfg)
    if cfg.dataset in HUB_DATASETS:
        texts = _named_dataset_texts(cfg, split)
    else:
        texts = _local_texts(Path(cfg.dataset).expanduser(), split, cfg.text_column)
    if cfg.clean:
        texts = [clean_text(t) for t in texts]
    return [t for t in texts if t.strip()]


def _named_dataset_texts(cfg: DataConfig, split: str) -> list[str]:
    if data_mirror() is not None:
        return _read_table_column(_mirror_split(cfg.dataset, split), cfg.text_column)
    return _hub_texts(HUB_DATASETS[cfg.dataset], split, cfg.text_column)


def _hub_texts(source: HubDataset, split: str, column: str) -> list[str]:
    import datasets

    if split not in source.splits:
        raise ConfigError(f"{source.path} has no split {split!r}; splits: {', '.join(source.splits)}")
    local = Path(source.path).exists()
    if not local and not hub_reachable():
        raise ConfigError(
            f"dataset {source.path} needs the Hugging Face Hub, which is unreachable; "
            "set SWEEP_DATA_DIR to a local mirror or pass a local parquet / jsonl / txt path"
        )
    table = datasets.load_dataset(source.path, source.name, split=split)
    if column not in table.column_names:
        raise ConfigError(f"{source.path} has no column {column!r}; columns: {', '.join(table.column_names)}")
    return list(table[column])


def _local_files(root: Path, split: str) -> list[Path]:
    """Files of `split` under root: `split.*` files in a folder, else every data file."""
    if root.is_file():
        return [root]
    named = sorted(p for p in root.glob(f"{split}.*") if p.suffix in LOCAL_SUFFIXES)
    if named:
        return named
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
    if not files:
        raise ConfigError(f"{root} holds no parquet, jsonl or txt files")
    return files


def _has_named_splits(root: Path) -> bool:
    return root.is_dir() and any(p.suffix in LOCAL_SUFFIXES for p in root.glob("train.*"))


def _local_texts(root: Path, split: str, column: str) -> list[str]:
    texts: list[str] = []
    for path in _local_files(root, split):
        texts.extend(_read_local_file(path, column))
    if not any(t.strip() for t in texts):
        raise ConfigError(f"{root} holds no text: the data file is empty")
    if _has_named_splits(root):
        return texts
    # One pool of documents: every 10th document is held out for testing.
    if len(texts) < 2:
        raise ConfigError(f"{root} holds one document; a train/test split needs at least two")
    held_out = [t for i, t in enumerate(texts) if i % 10 == 9] or texts[-1:]
    kept = [t for i, t in enumerate(texts) if i % 10 != 9] if len(texts) >= 10 else texts[:-1]
    return held_out if split in ("test", "validation") else kept


def _read_local_file(path: Path, column: str) -> list[str]:
    if path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"{path}: unsupported file type {path.suffix or '(none)'}; use parquet, jsonl or txt")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path} is empty; give a file with text in it")
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix == ".parquet":
        return _read_table_column(path, column)
    texts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{number} is not valid JSON lines") from None
            if not isinstance(record, dict) or column not in record:
                raise ConfigError(f"{path}:{number} has no field {column!r}; pass --text-column")
            texts.append(str(record[column]))
    return texts


def _read_table_column(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as error:  # pyarrow raises ArrowInvalid and OSError subclasses
        raise ConfigError(f"{path} is not a readable parquet file ({error})") from None
    if column not in schema.names:
        raise ConfigError(f"{path} has no column {column!r}; columns: {', '.join(schema.names)}; pass --text-column")
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


# ---------------------------------------------------------------- windows


def pack_windows(documents: list[list[int]], eot_id: int, seq_len: int) -> np.ndarray:
    """Join documents with end-of-text and cut [N, seq_len + 1] windows overlapping by one token.

    Window i covers stream[i * seq_len : i * seq_len + seq_len + 1], so every
    token after the first is a target exactly once; the tail is padded.
    """
    lengths = np.fromiter((len(d) + 1 for d in documents), dtype=np.int64, count=len(documents))
    stream = np.empty(int(lengths.sum()), dtype=np.int32)
    position = 0
    for document in documents:
        stream[position : position + len(document)] = document
        stream[position + len(document)] = eot_id
        position += len(document) + 1
    count = max(1, -(-(len(stream) - 1) // seq_len))
    padded = np.full(count * seq_len + 1, PAD_ID, dtype=np.int32)
    padded[: len(stream)] = stream
    index = np.arange(count)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[index]


def pad_windows(documents: list[list[int]], seq_len: int) -> np.ndarray:
    """The study's layout: each document truncated to seq_len + 1 tokens and padded."""
    windows = np.full((len(documents), seq_len + 1), PAD_ID, dtype=np.int32)
    for row, document in enumerate(documents):
        kept = document[: seq_len + 1]
        windows[row, : len(kept)] = kept
    return windows


def repeat_windows(
    count: int, seq_len: int, vocab_size: int, seed: int, follow_probability: float = 0.5
) -> np.ndarray:
    """Random tokens with in-context bigrams: the induction-head task.

    Each window starts as uniform random tokens. Going left to right, a token
    that occurred earlier in the window is followed, with `follow_probability`,
    by the token that followed its first occurrence. So sub-sequences recur at
    random offsets and periods, and a recurring token's successor is predictable
    only by finding its earlier occurrence and copying what came next, which is
    what an induction head does. With a vocabulary about the size of the window,
    most tokens recur.

    Two earlier layouts taught 2-layer models something else. Runs repeated
    right away ("r r") with short periods made layer-0 heads that look back a few
    tokens useful on their own, and layer 1 then matched tokens through them at
    that shifted offset instead of through a previous-token head. Repeats that
    start near position 0 let a model copy from a fixed fraction of its own
    position instead of matching tokens.
    """
    rng = np.random.default_rng(seed)
    windows = rng.integers(0, vocab_size, size=(count, seq_len + 1), dtype=np.int32)
    follows = rng.random((count, seq_len + 1)) < follow_probability
    for start in range(0, count, REPEAT_CHUNK_ROWS):  # bounds the [rows, vocab] table
        chunk, chunk_follows = windows[start : start + REPEAT_CHUNK_ROWS], follows[start : start + REPEAT_CHUNK_ROWS]
        rows = np.arange(len(chunk))
        first_follower = np.full((len(chunk), vocab_size), -1, dtype=np.int32)
        for position in range(seq_len):
            token = chunk[:, position]
            known = first_follower[rows, token]
            seen = known >= 0
            copy = seen & chunk_follows[:, position + 1]
            chunk[copy, position + 1] = known[copy]
            first_follower[rows[~seen], token[~seen]] = chunk[~seen, position + 1]
    return windows


@dataclass
class PreparedData:
    """Token windows of both splits and the tokenizer that made them."""

    train: np.ndarray
    test: np.ndarray
    tokenizer: TextTokenizer


# Passes over the training text past which a small model memorises it rather than learns the language.
MANY_EPOCHS = 10


def repetition_warning(cfg: DataConfig, train_windows: np.ndarray, max_tokens: int) -> str | None:
    """A line when training would pass over a small training text many times, or None."""
    tokens = int(train_windows.shape[0]) * max(int(train_windows.shape[1]) - 1, 1)
    epochs = max_tokens / max(tokens, 1)
    if cfg.dataset == SYNTHETIC or epochs < MANY_EPOCHS:
        return None
    return (f"warning: {cfg.dataset} has {tokens:,} training tokens, so {max_tokens:,} tokens of training pass over "
            f"it about {epochs:.0f} times: expect the model to memorise it (held-out loss rising again); "
            "give more text or lower max_tokens")


def prepare_data(cfg: DataConfig, seq_len: int, log=lambda message: None) -> PreparedData:
    """Load, clean, tokenize and window both splits, through the on-disk cache."""
    if cfg.dataset == SYNTHETIC:
        tokenizer = TextTokenizer(synthetic_tokenizer(cfg.repeat_vocab), f"repeat:{cfg.repeat_vocab}")
        return PreparedData(
            *(
                repeat_windows(REPEAT_WINDOWS.get(split, 2048), seq_len, cfg.repeat_vocab, REPEAT_SEEDS.get(split, 4))
                for split in (cfg.train_split, cfg.test_split)
            ),
            tokenizer,
        )
    train_texts = load_texts(cfg, cfg.train_split)
    if not train_texts:
        raise ConfigError(f"the {cfg.train_split} split of {cfg.dataset} holds no text")
    tokenizer = load_tokenizer(cfg.tokenizer, train_texts, cache_dir())
    asked = bpe_vocab_size(cfg.tokenizer)
    if asked and tokenizer.vocab_size < asked:
        log(f"--tokenizer {cfg.tokenizer}: the training text yields only {tokenizer.vocab_size:,} tokens (bytes, "
            f"every merge it supports, and the special tokens); the model's vocabulary is {tokenizer.vocab_size:,}")
    windows = []
    for split, texts in ((cfg.train_split, train_texts), (cfg.test_split, None)):
        windows.append(_cached_windows(cfg, split, texts, tokenizer, seq_len, log))
    return PreparedData(windows[0], windows[1], tokenizer)


def _cached_windows(cfg, split, texts, tokenizer, seq_len, log) -> np.ndarray:
    key = json.dumps(
        {
            "format": CACHE_FORMAT,
            "data": asdict(cfg) | {"tokenizer": tokenizer.fingerprint},
            "source": _source_identity(cfg, split),
            "split": split,
            "seq_len": seq_len,
        },
        sort_keys=True,
    )
    path = cache_dir() / "windows" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    if path.is_file():
        log(f"{cfg.dataset}/{split}: cached windows {path}")
        return np.load(path)
    if texts is None:
        texts = load_texts(cfg, split)
    if not texts:
        raise ConfigError(f"the {split} split of {cfg.dataset} holds no text")
    documents = tokenizer.encode_batch(texts)
    windows = pack_windows(documents, tokenizer.eot_id, seq_len) if cfg.pack else pad_windows(documents, seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, windows)
    os.replace(partial, path)  # atomic, so concurrent sweeps never read half a file
    log(f"{cfg.dataset}/{split}: tokenized {len(texts)} documents into {len(windows)} windows")
    return windows


def _source_identity(cfg: DataConfig, split: str) -> list:
    """What changes when the input files change: paths, sizes and modification times."""
    if cfg.dataset in HUB_DATASETS:
        mirror = data_mirror()
        if mirror is None:
            return ["hub", HUB_DATASETS[cfg.dataset].path, HUB_DATASETS[cfg.dataset].name]
        files = [mirror / cfg.dataset / f"{split}.parquet"]
    else:
        files = _local_files(Path(cfg.dataset).expanduser(), split)
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]

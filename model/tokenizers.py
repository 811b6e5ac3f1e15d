"""Tokenizers: every kind ends up as a `tokenizers.Tokenizer` saved as tokenizer.json.

Specs: `gpt2`, `bert` (bert-base-cased) from the data mirror
(`$SWEEP_DATA_DIR/tokenizers/<spec>/`) when it holds them, else from the
Hugging Face Hub through transformers; `bpe:N`, a byte-level BPE with vocabulary N trained on the
training split and cached by content hash; `bytes`; or a path to a
tokenizer.json or a Hugging Face tokenizer folder.

`transformers` is imported only for the Hub's gpt2 and bert tokenizers: the rest load with `tokenizers` alone.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .config import ConfigError
from .paths import data_mirror

EOT = "<|endoftext|>"
HUB_TOKENIZERS = {"gpt2": "gpt2", "bert": "bert-base-cased"}
# Tokens that already mean "end of document" in common vocabularies, best first.
_EOT_CANDIDATES = (EOT, "</s>", "[SEP]", "<eos>", "<|eos|>")


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte as the printable character that stands for it in token strings."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()
OFFLINE_HINT = "use --tokenizer bpe:N (trained locally), bytes, or a path to a tokenizer.json or tokenizer folder"


class TextTokenizer:
    """A fast tokenizer plus the id that separates packed documents."""

    def __init__(self, backend: Tokenizer, name: str) -> None:
        self.backend = backend
        self.name = name
        self.eot_id = _end_of_text_id(backend)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Content hash: two tokenizers with equal fingerprints tokenize alike."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # The Rust batch API tokenizes on every core.
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def readable(self, ids: Iterable[int]) -> str:
        """Text for people: the end-of-document token (`<|endoftext|>`) as the blank line between documents."""
        ids = list(ids)
        if self.eot_id is None:
            return self.decode(ids)
        documents, current = [], []
        for token in ids:
            if token == self.eot_id:
                documents.append(current)
                current = []
            else:
                current.append(token)
        documents.append(current)
        return "\n\n".join(self.decode(document) for document in documents)

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id decoded on its own: tick labels for heatmaps and token tables. A byte-level token holding
        part of a multi-byte character shows its bytes (`\\xe2\\x80`), not the replacement character."""
        strings = []
        for token in ids:
            text = self.backend.decode([token], skip_special_tokens=False)
            if "\ufffd" in text and (raw := self._byte_level_bytes(token)) is not None:
                text = raw.decode("utf-8", errors="backslashreplace")
            strings.append(text)
        return strings

    def _byte_level_bytes(self, token: int) -> bytes | None:
        """The bytes of a byte-level BPE token (GPT-2's printable stand-ins mapped back), or None."""
        piece = self.backend.id_to_token(token)
        if piece is None or any(ch not in _BYTE_OF_CHAR for ch in piece):
            return None
        return bytes(_BYTE_OF_CHAR[ch] for ch in piece)

    def save(self, path: str | os.PathLike) -> None:
        self.backend.save(str(path))


def _end_of_text_id(backend: Tokenizer) -> int:
    vocab = backend.get_vocab(with_added_tokens=True)
    for token in _EOT_CANDIDATES:
        if token in vocab:
            return vocab[token]
    backend.add_special_tokens([EOT])
    return backend.token_to_id(EOT)


def bpe_vocab_size(spec: str) -> int | None:
    """N of a `bpe:N` spec, None for other specs."""
    if not spec.startswith("bpe:"):
        return None
    try:
        size = int(spec[4:])
    except ValueError:
        raise ConfigError(f"--tokenizer {spec!r}: N in bpe:N must be an integer, e.g. bpe:8192") from None
    if not 300 <= size <= 1_000_000:
        raise ConfigError(f"--tokenizer {spec!r}: N in bpe:N must be between 300 and 1000000")
    return size


def check_tokenizer_spec(spec: str) -> None:
    """Validate a spec without loading anything (used before a sweep starts)."""
    if spec in HUB_TOKENIZERS or spec == "bytes" or bpe_vocab_size(spec):
        return
    if not Path(spec).exists():
        raise ConfigError(
            f"--tokenizer {spec!r} is not gpt2, bert, bpe:N, bytes or an existing path"
        )


def vocabulary_size(spec: str) -> int:
    """The vocabulary a spec gives, known before any text is read: `repeat:N` and `bpe:N` by their N (a BPE may learn
    fewer), bytes by its alphabet, a Hub or local tokenizer by loading it (from the mirror where there is one)."""
    if spec.startswith("repeat:"):
        return int(spec.split(":", 1)[1]) + 2  # t0..t{N-1}, <unk>, the end-of-text token
    size = bpe_vocab_size(spec)
    return size if size else load_tokenizer(spec).vocab_size


def load_tokenizer(spec: str, training_texts: list[str] | None = None, cache_dir: Path | None = None) -> TextTokenizer:
    """Resolve a tokenizer spec; `bpe:N` trains on `training_texts` (cached in `cache_dir`)."""
    check_tokenizer_spec(spec)
    if spec == "bytes":
        return TextTokenizer(byte_tokenizer(), "bytes")
    size = bpe_vocab_size(spec)
    if size:
        if not training_texts:
            raise ConfigError(f"--tokenizer {spec} needs training text to learn its vocabulary")
        return TextTokenizer(trained_bpe(training_texts, size, cache_dir), spec)
    if spec in HUB_TOKENIZERS:
        mirrored = mirrored_tokenizer(spec)
        if mirrored is not None:
            return TextTokenizer(tokenizer_from_path(mirrored), spec)
        return TextTokenizer(hugging_face_tokenizer(HUB_TOKENIZERS[spec], spec), spec)
    return TextTokenizer(tokenizer_from_path(Path(spec)), spec)


def mirrored_tokenizer(spec: str) -> Path | None:
    """`$SWEEP_DATA_DIR/tokenizers/<spec>/` when the data mirror holds that Hub tokenizer's files:
    the same tokenizer.json the Hub serves, so an offline run tokenizes exactly as an online one."""
    mirror = data_mirror()
    if mirror is None:
        return None
    folder = mirror / "tokenizers" / spec
    return folder if (folder / "tokenizer.json").is_file() else None


def tokenizer_from_path(path: Path) -> Tokenizer:
    """A tokenizer.json file, or a folder holding one or a Hugging Face tokenizer."""
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust loader raises bare Exceptions
            raise ConfigError(f"--tokenizer {path} is not a valid tokenizer.json ({error})") from None
    return hugging_face_tokenizer(str(path), str(path))


def hugging_face_tokenizer(name_or_path: str, spec: str) -> Tokenizer:
    """Load a fast tokenizer with transformers: local cache first, the Hub only if reachable."""
    from transformers import AutoTokenizer

    is_local = Path(name_or_path).exists()
    try:
        # A local folder or a cached Hub download needs no network.
        loaded = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as error:
        if is_local:
            raise ConfigError(f"--tokenizer {spec}: {name_or_path} holds no loadable tokenizer ({error})") from None
        if not hub_reachable():
            raise ConfigError(
                f"--tokenizer {spec} needs the Hugging Face Hub, which is unreachable; {OFFLINE_HINT}"
            ) from None
        loaded = AutoTokenizer.from_pretrained(name_or_path)
    if not getattr(loaded, "is_fast", False):
        raise ConfigError(f"--tokenizer {spec} has no fast (Rust) tokenizer; {OFFLINE_HINT}")
    return loaded.backend_tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host answers; fails in milliseconds offline instead of retrying for a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def byte_tokenizer() -> Tokenizer:
    """256 byte tokens plus end-of-text: a byte-level BPE with no merges."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def trained_bpe(texts: list[str], vocab_size: int, cache_dir: Path | None) -> Tokenizer:
    """Byte-level BPE trained on `texts`; cached by the hash of the texts and the size."""
    digest = hashlib.sha256(str(vocab_size).encode())
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\x00")
    cached = cache_dir / "tokenizers" / f"bpe{vocab_size}-{digest.hexdigest()[:16]}.json" if cache_dir else None
    if cached is not None and cached.is_file():
        return Tokenizer.from_file(str(cached))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        tokenizer.save(str(partial))
        os.replace(partial, cached)  # atomic: a reader never sees half a file
    return tokenizer


def synthetic_tokenizer(vocab_size: int) -> Tokenizer:
    """Word-level vocabulary t0 .. t{N-1} for the synthetic `repeat` task."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<unk>"] = vocab_size
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>", EOT])
    return tokenizer

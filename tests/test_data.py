"""Data: loading, packing, the synthetic task, tokenizers and the caches."""

import json

import numpy as np
import pytest

from model import data as data_module
from model.config import ConfigError, DataConfig
from model.data import HubDataset, load_texts, pack_windows, pad_windows, prepare_data, repeat_windows
from model.tokenizers import TextTokenizer, byte_tokenizer, load_tokenizer
from model.transformer import PAD_ID

from conftest import write_reviews


def test_packing_keeps_every_token():
    rng = np.random.default_rng(0)
    documents = [list(rng.integers(0, 100, size=rng.integers(1, 30))) for _ in range(50)]
    windows = pack_windows(documents, eot_id=999, seq_len=16)
    stream = [t for d in documents for t in d + [999]]
    assert windows.shape[1] == 17
    # every token after the first is a target exactly once, in order
    targets = windows[:, 1:].reshape(-1)
    assert list(targets[targets != PAD_ID]) == stream[1:]
    assert windows[0, 0] == stream[0]
    # consecutive windows overlap by one token: no prediction is lost at the seams
    assert (windows[1:, 0] == windows[:-1, -1]).all()


def test_truncate_and_pad_keeps_the_study_layout():
    windows = pad_windows([[1, 2, 3], list(range(40))], seq_len=8)
    assert windows.tolist()[0] == [1, 2, 3] + [PAD_ID] * 6
    assert windows.tolist()[1] == list(range(9))


def first_followers(row):
    """(position, distance to the token's first occurrence, whether its successor was copied)."""
    first = {}
    for position, token in enumerate(row[:-1]):
        if token in first:
            yield position, position - first[token], row[position + 1] == row[first[token] + 1]
        else:
            first[token] = position


def test_repeat_windows_copy_successors_of_earlier_tokens_at_random_distances():
    windows = repeat_windows(400, 64, 64, seed=0)
    assert windows.shape == (400, 65) and windows.min() >= 0 and windows.max() < 64
    recurrences = [found for row in windows for found in first_followers(row.tolist())]
    copied = [(position, distance) for position, distance, same in recurrences if same]
    # Most tokens recur in a window, and about half of the recurring ones are followed by
    # what followed them first (the rest by chance, 1 in 64).
    assert len(recurrences) > 400 * 20
    assert 0.45 < len(copied) / len(recurrences) < 0.6
    # Neither a look-back distance nor a position predicts a copy.
    distances = np.bincount([distance for _, distance in copied], minlength=64)
    positions = np.bincount([position for position, _ in copied], minlength=64)
    assert (distances[1:40] > 0).all() and distances.max() < 0.1 * len(copied)
    assert (positions[8:] > 0).all() and positions.max() < 0.05 * len(copied)


def test_repeat_windows_are_the_same_for_a_seed_and_differ_across_seeds():
    assert (repeat_windows(10, 32, 64, seed=3) == repeat_windows(10, 32, 64, seed=3)).all()
    assert (repeat_windows(10, 32, 64, seed=3) != repeat_windows(10, 32, 64, seed=4)).any()


def test_local_jsonl_split_and_clean(reviews_file):
    cfg = DataConfig(dataset=str(reviews_file), clean=True)
    train, test = load_texts(cfg, "train"), load_texts(cfg, "test")
    assert len(train) == 360 and len(test) == 40
    assert not set(train) & set(test)


def test_clean_strips_breaks_and_lowercases(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("Great<br /><br />MOVIE\n")
    (tmp_path / "test.txt").write_text("Bad<br/>film\n")
    assert load_texts(DataConfig(dataset=str(tmp_path), clean=True), "train") == ["great  movie"]
    assert load_texts(DataConfig(dataset=str(tmp_path), clean=True), "test") == ["bad film"]


def test_mirror_reads_real_imdb(data_mirror):
    texts = load_texts(DataConfig(dataset="imdb"), "test")
    assert len(texts) == 24996


def test_mirror_names_missing_split(data_mirror):
    with pytest.raises(ConfigError, match="splits there: test, validation"):
        load_texts(DataConfig(dataset="wikitext-2"), "train")


def test_hub_loading_code_reads_a_dataset_folder(tmp_path, monkeypatch):
    """The Hub path runs `datasets.load_dataset`; here on a folder the test writes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "fake-imdb"
    folder.mkdir()
    for split in ("train", "test"):
        pq.write_table(
            pa.table({"text": [f"{split} review {i}" for i in range(20)], "label": [0] * 20}),
            folder / f"{split}.parquet",
        )
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)
    monkeypatch.setitem(data_module.HUB_DATASETS, "imdb", HubDataset(str(folder), None, ("train", "test")))
    texts = load_texts(DataConfig(dataset="imdb"), "test")
    assert texts[:2] == ["test review 0", "test review 1"]


def test_hub_dataset_unreachable_is_one_clear_error(monkeypatch):
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)
    with pytest.raises(ConfigError, match="unreachable; set SWEEP_DATA_DIR"):
        load_texts(DataConfig(dataset="imdb"), "train")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", "", "is empty"),
        ("data.csv", "a,b\n", "unsupported file type .csv"),
        ("nocol.jsonl", json.dumps({"body": "x"}) + "\n", "has no field 'text'"),
        ("broken.parquet", "not parquet", "not a readable parquet"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_texts(DataConfig(dataset=str(path)), "train")


def test_bytes_tokenizer_round_trips():
    tokenizer = TextTokenizer(byte_tokenizer(), "bytes")
    text = "héllo <br /> wörld\n"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode()) and max(ids) < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == 257 and tokenizer.eot_id == 256


def test_bpe_is_trained_once_and_cached(reviews_file, monkeypatch):
    texts = load_texts(DataConfig(dataset=str(reviews_file)), "train")
    first = load_tokenizer("bpe:300", texts, data_module.cache_dir())
    import tokenizers

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(tokenizers.Tokenizer, "train_from_iterator", no_training, raising=False)
    second = load_tokenizer("bpe:300", texts, data_module.cache_dir())
    assert second.fingerprint == first.fingerprint
    assert first.decode(first.encode(texts[0])) == texts[0]


def test_windows_are_tokenized_once_then_cached(reviews_file, monkeypatch):
    cfg = DataConfig(dataset=str(reviews_file), tokenizer="bytes")
    first = prepare_data(cfg, seq_len=16)

    def tokenized_again(*args):
        raise RuntimeError("tokenized again")

    monkeypatch.setattr(TextTokenizer, "encode_batch", tokenized_again)
    second = prepare_data(cfg, seq_len=16)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.test, second.test)
    with pytest.raises(RuntimeError, match="tokenized again"):
        prepare_data(cfg, seq_len=20)  # another seq_len is another cache entry


def test_local_hugging_face_tokenizer_folder(tmp_path, reviews_file):
    """The transformers loading path (used for gpt2 / bert) on a folder saved by the test."""
    from transformers import PreTrainedTokenizerFast

    texts = load_texts(DataConfig(dataset=str(reviews_file)), "train")
    backend = load_tokenizer("bpe:300", texts, tmp_path / "cache").backend
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(tmp_path / "hf")
    from model.tokenizers import hugging_face_tokenizer

    loaded = TextTokenizer(hugging_face_tokenizer(str(tmp_path / "hf"), "local"), "local")
    assert loaded.encode(texts[0]) == TextTokenizer(backend, "x").encode(texts[0])
    assert loaded.eot_id == backend.token_to_id("<|endoftext|>")
    with pytest.raises(ConfigError, match="holds no loadable tokenizer"):
        hugging_face_tokenizer(str(tmp_path), "empty-folder")


def test_gpt2_without_hub_names_the_offline_alternatives(monkeypatch):
    monkeypatch.delenv("SWEEP_DATA_DIR", raising=False)  # no mirrored copy either
    with pytest.raises(
        ConfigError, match=r"gpt2 needs the Hugging Face Hub, which is unreachable; use --tokenizer bpe:N"
    ):
        load_tokenizer("gpt2")


@pytest.mark.parametrize("spec", ["bpe:abc", "bpe:10", "word2vec"])
def test_bad_tokenizer_specs(spec):
    with pytest.raises(ConfigError, match="--tokenizer"):
        load_tokenizer(spec)


def test_gpt2_resolves_offline_from_the_mirror_as_the_study_tokenized(data_mirror):
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.encode("This movie is") == [1212, 3807, 318]
    assert tokenizer.eot_id == 50256 and tokenizer.vocab_size == 50257


def test_missing_splits_are_caught_before_any_data_is_read(data_mirror, tmp_path):
    from model.data import check_data

    with pytest.raises(
        ConfigError, match="split 'train' of wikitext-2 is not in SWEEP_DATA_DIR.*splits there: test, validation"
    ):
        check_data(DataConfig(dataset="wikitext-2", tokenizer="bytes"))
    check_data(DataConfig(dataset="wikitext-2", tokenizer="bytes", train_split="validation"))
    folder = tmp_path / "named"
    write_reviews(folder / "train.jsonl")
    write_reviews(folder / "test.jsonl")
    with pytest.raises(ConfigError, match="has no validation.* file; splits there: test, train"):
        check_data(DataConfig(dataset=str(folder), tokenizer="bytes", test_split="validation"))
    with pytest.raises(ConfigError, match="the repeat task has no split 'dev'"):
        check_data(DataConfig(dataset="repeat", test_split="dev"))


def test_text_for_people_shows_document_breaks_and_the_bytes_of_split_characters(data_mirror):
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.readable(tokenizer.encode("one<|endoftext|>two")) == "one\n\ntwo"  # not a raw <|endoftext|>
    ids = tokenizer.encode("“quote”")  # each curly quote is three bytes, split over two byte-level tokens
    strings = tokenizer.token_strings(ids)
    assert "\ufffd" not in "".join(strings)
    assert strings[0] == "\\xe2\\x80" and strings[-1] == "\\x9d"
    assert tokenizer.token_strings(tokenizer.encode(" café")) == [" café"]  # whole characters stay as they are


def test_a_bpe_vocabulary_the_text_cannot_fill_and_a_text_trained_over_many_times_are_said(reviews_file):
    from model.data import repetition_warning

    lines = []
    data = prepare_data(DataConfig(dataset=str(reviews_file), tokenizer="bpe:5000"), 16, lines.append)
    assert data.tokenizer.vocab_size < 5000
    assert any(f"yields only {data.tokenizer.vocab_size:,} tokens" in line for line in lines), lines
    cfg = DataConfig(dataset=str(reviews_file))
    tokens = data.train.shape[0] * 16
    assert repetition_warning(cfg, data.train, 2 * tokens) is None
    warning = repetition_warning(cfg, data.train, 100 * tokens)
    assert "about 100 times" in warning and "memorise" in warning
    assert repetition_warning(DataConfig(dataset="repeat"), data.train, 100 * tokens) is None

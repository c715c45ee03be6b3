import pytest

from students.tokenizer import get_tokenizer


def test_offline_short_name_gives_full_vocab(tokenizer):
    assert len(tokenizer) == 30522
    enc = tokenizer("Hello world")
    assert enc["input_ids"] == [101, 7592, 2088, 102]
    assert set(enc) == {"input_ids", "attention_mask"}


def test_directory_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = get_tokenizer(tmp_path)
    assert len(again) == 30522 and again("a b c")["input_ids"] == tokenizer("a b c")["input_ids"]


def test_no_implicit_truncation(tokenizer):
    assert len(tokenizer("word " * 700)["input_ids"]) == 702


def test_missing_directory_is_clear():
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_tokenizer("./no/such/dir")


def test_directory_without_tokenizer_files_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has none of"):
        get_tokenizer(tmp_path)

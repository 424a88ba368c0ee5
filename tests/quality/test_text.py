"""Windows of the long texts."""

from epikv_triton.quality import corpora, text


def test_windows_are_consecutive_full_length_and_seeded(char_tokenizer):
    settings = text.Settings(windows=3, window=200)
    windows = text.build_windows(char_tokenizer, settings, seed=0)
    assert [kind for kind, _ in windows] == ["prose"] * 3 + ["code"] * 3
    assert all(len(ids) == 200 for _, ids in windows)
    assert text.build_windows(char_tokenizer, settings, seed=0) == windows
    assert text.build_windows(char_tokenizer, settings, seed=1) != windows


def test_token_stream_wraps_around_and_marks_unit_starts(char_tokenizer):
    stream, starts = corpora.token_stream(char_tokenizer, ["ab", "cde"], 12, start=1)
    assert char_tokenizer.decode(stream) == "cdeabcdeabcd"
    assert starts == [0, 3, 5, 8, 10]

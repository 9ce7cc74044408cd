"""Text files people write (transcripts, the review file) are read in the encodings their editors save."""

from __future__ import annotations

import pytest

from cosytune.data.transcribe import load_transcripts
from cosytune.errors import DataError
from cosytune.fileio import read_user_text

LINES = "第一句|今天天气很好。\nsecond|Hello there, 你好!\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32", "gbk", "gb18030"])
def test_transcripts_in_every_common_encoding(tmp_path, encoding):
    p = tmp_path / "t.txt"
    p.write_bytes(LINES.encode(encoding))
    assert read_user_text(p) == LINES
    table = load_transcripts(p)
    assert table.names == ["第一句", "second"]
    assert table.lookup("x/第一句.wav", "第一句.wav") == "今天天气很好。"


def test_other_encodings_get_a_message_not_a_traceback(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("name|caf\u00e9 au lait\n".encode("latin-1"))  # no CJK: GBK would be a guess
    with pytest.raises(DataError, match="not UTF-8.*Save it as UTF-8"):
        load_transcripts(p)
    p.write_bytes(b"\xff\xfe" + b"\x00\xd8")  # a UTF-16 BOM, then an unpaired surrogate
    with pytest.raises(DataError, match="UTF-16"):
        read_user_text(p)


def test_review_file_saved_as_utf16_by_a_spreadsheet(tmp_path):
    from cosytune.data.review import REVIEW_COLUMNS, read_review

    text = "\t".join(REVIEW_COLUMNS) + "\n" + "utt1\t1.5\tok\t\t\t\t你好 世界" + "\n"
    p = tmp_path / "review.tsv"
    p.write_bytes(text.encode("utf-16"))
    assert read_review(p)["utt1"].text == "你好 世界"

import pytest

from adaroute import AdarouteError
from adaroute.data import builtin_parts, load_text, load_texts


def test_builtin_split_is_deterministic_disjoint_and_large():
    a, b = builtin_parts(), builtin_parts()
    assert a == b
    calib, heldout = a["calib"], a["heldout"]
    assert len(calib) > 200_000 and len(heldout) > 100_000
    assert heldout[:2000] not in calib
    assert load_text("builtin:heldout").text == heldout


def test_unknown_builtin():
    with pytest.raises(AdarouteError, match="builtin:calib or builtin:heldout"):
        load_text("builtin:train")


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"  \n\t ", "is empty"), (b"abc\x00def", "looks binary"), (b"caf\xe9 latin-1", "not UTF-8")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "f.txt"
    path.write_bytes(content)
    with pytest.raises(AdarouteError, match=message):
        load_text(str(path))


def test_missing_directory_and_unreadable(tmp_path):
    with pytest.raises(AdarouteError, match="no such file"):
        load_text(str(tmp_path / "nope.txt"))
    with pytest.raises(AdarouteError, match="is a directory"):
        load_text(str(tmp_path))
    with pytest.raises(AdarouteError, match="no data given"):
        load_texts([])


def test_reads_utf8(tmp_path):
    (tmp_path / "t.txt").write_text("naïve café — ok", encoding="utf-8")
    assert load_text(str(tmp_path / "t.txt")).text == "naïve café — ok"

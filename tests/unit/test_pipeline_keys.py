"""The pieces of `cosytune run`'s skip rule that need no model: file-hash cache, labels, explanations."""

from __future__ import annotations

import ast
from importlib.util import find_spec
from pathlib import Path

import pytest

from cosytune.pipeline import PIPELINE, STAGES, FileHashes, _explain, tree

LIBRARY_MODULES = ("cosytune.pipeline", "cosytune.steps", "cosytune.train.api", "cosytune.infer.single",
                   "cosytune.console")


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_library_entry_points_import_no_cli_code(module):
    """The library sits below the CLI: no import of cosytune.cli, not even inside a function."""
    spec = find_spec(module)
    assert spec is not None and spec.origin
    tree_ = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    imported = [n.module for n in ast.walk(tree_) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree_) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("cosytune.cli")]


def test_stages_are_one_table():
    assert STAGES == tuple(s.name for s in PIPELINE)
    assert STAGES[0] == "prepare-audio" and STAGES[-1] == "synthesize"


def test_file_hashes_are_cached_by_size_and_mtime(tmp_path):
    f = tmp_path / "big.pt"
    f.write_bytes(b"a" * 100)
    h = FileHashes()
    first = h.digest(f)
    st = f.stat()
    # A cache entry with the same (size, mtime_ns) is trusted: the file is not read again.
    cached = FileHashes({str(f.resolve()): [st.st_size, st.st_mtime_ns, "cached"]})
    assert cached.digest(f) == "cached"
    # A changed file (new size or mtime) is hashed again.
    f.write_bytes(b"b" * 101)
    assert h.digest(f) != first and cached.digest(f) == h.digest(f)
    assert h.digest(tmp_path / "absent") == "missing"
    f2 = tmp_path / "gone"
    f2.write_bytes(b"x")
    h.digest(f2)
    f2.unlink()
    assert str(f2.resolve()) not in h.pruned() and str(f.resolve()) in h.pruned()


def test_cache_key_is_the_resolved_path(tmp_path, monkeypatch):
    f = tmp_path / "a.wav"
    f.write_bytes(b"x")
    h = FileHashes()
    monkeypatch.chdir(tmp_path)
    h.digest(Path("a.wav"))
    assert list(h.cache) == [str(f.resolve())]


def test_tree_labels_are_relative(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.mp3").write_bytes(b"1")
    (tmp_path / "y.wav").write_bytes(b"2")
    (tmp_path / "epoch_0.state.pt").write_bytes(b"3")
    assert set(tree(tmp_path, "audio", exclude=(".state.pt",))) == {"audio/sub/x.mp3", "audio/y.wav"}
    assert tree(tmp_path / "y.wav", "transcripts.txt") == {"transcripts.txt": tmp_path / "y.wav"}


def test_explain_names_what_changed():
    old = {"setting:overrides": "[]", "data/train/text": "h1", "after:transcribe": "r1", "audio/a.mp3": "x"}
    new = {"setting:overrides": '["optim.lr=1e-3"]', "data/train/text": "h2", "after:transcribe": "r2",
           "audio/b.mp3": "y"}
    note = _explain(old, new)
    assert "overrides changed" in note and "data/train/text changed" in note
    assert "audio/a.mp3 removed" in note and "audio/b.mp3 added" in note
    assert "after transcribe re-ran" in note
    assert _explain(None, new) == "" and _explain(new, new) == ""


def test_explain_puts_settings_before_a_long_list_of_files():
    old = {"setting:requested": "false"}
    new = {f"base/f{i}": "h" for i in range(10)}
    note = _explain(old, new)
    assert note.startswith("requested changed") and "7 more files changed" in note


def test_sample_sentence_follows_the_language_of_the_data():
    from cosytune.pipeline import SAMPLE_TEXTS, data_language

    assert data_language(["今天天气很好。", "我们去公园吧"]) == "zh"
    assert data_language(["Hello there.", "Please enter your password."]) == "en"
    assert data_language(["Hello, 你好!"]) == "zh"  # two ideographs weigh as much as six letters
    assert data_language([]) == "en" and set(SAMPLE_TEXTS) == {"en", "zh"}

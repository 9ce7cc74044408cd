"""cosytune.infer.distributed: dealing segments to ranks, the manifest parts of an interrupted run, valid outputs."""

from __future__ import annotations

import numpy as np
import pytest

from cosytune.fileio import read_jsonl, write_jsonl
from cosytune.infer.distributed import BatchRanks, deal_by_length, output_is_valid, part_path, read_manifests


def test_deal_by_length_is_greedy_longest_first_and_balanced():
    weights = [5, 1, 9, 3, 3, 8, 2, 7]
    shares = deal_by_length(weights, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(weights)))  # each segment exactly once
    assert all(s == sorted(s) for s in shares)  # input order within a rank
    loads = [sum(weights[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= max(weights)
    assert deal_by_length(weights, 3) == shares  # deterministic
    assert deal_by_length(weights, 1) == [list(range(len(weights)))]
    assert deal_by_length([], 2) == [[], []]
    with pytest.raises(ValueError, match="world_size"):
        deal_by_length(weights, 0)


def test_deal_by_length_exact_assignment():
    # 9 -> r0 (9); 8 -> r1 (8); 7 -> r1 (15); 5 -> r0 (14); 3 -> r0 (17); 3 -> r1 (18); 2 -> r0 (19); 1 -> r1 (19)
    assert deal_by_length([5, 1, 9, 3, 3, 8, 2, 7], 2) == [[0, 2, 3, 6], [1, 4, 5, 7]]


def test_single_process_is_the_identity():
    ranks = BatchRanks()
    assert ranks.share([3, 1, 2], weight=float) == [3, 1, 2]
    assert ranks.gather("x") == ["x"] and ranks.device("cpu") == "cpu"


def test_parts_of_an_interrupted_run_are_read_and_folded(tmp_path):
    manifest = tmp_path / "batch.jsonl"
    write_jsonl(manifest, [{"name": "a", "settings_sha256": "old"}, {"name": "b", "settings_sha256": "1"}])
    write_jsonl(part_path(manifest, 0), [{"name": "a", "settings_sha256": "new"}])
    write_jsonl(part_path(manifest, 1), [{"name": "c", "settings_sha256": "3"}])
    assert part_path(manifest, 1).name == "batch.rank1.jsonl"
    merged = read_manifests(manifest)
    assert merged == {"a": {"name": "a", "settings_sha256": "new"}, "b": {"name": "b", "settings_sha256": "1"},
                      "c": {"name": "c", "settings_sha256": "3"}}
    assert BatchRanks().read_previous(manifest) == merged  # rank 0 folds the parts into the manifest
    assert not list(tmp_path.glob("batch.rank*")) and {r["name"] for r in read_jsonl(manifest)} == {"a", "b", "c"}
    ranks = BatchRanks(rank=1, world_size=2)  # what a rank records: only the segments it wrote
    previous = {"b": {"name": "b"}}
    ranks.write_manifest(manifest, [previous["b"], {"name": "d"}], previous)
    assert read_jsonl(part_path(manifest, 1)) == [{"name": "d"}]


def test_output_is_valid(tmp_path):
    from cosytune.audio.io import write_wav_pcm16

    wav = tmp_path / "x.wav"
    assert not output_is_valid(wav, {"seconds": 1.0})
    write_wav_pcm16(wav, np.zeros(24000, np.float32), 24000)
    assert output_is_valid(wav, {"seconds": 1.0}) and not output_is_valid(wav, {"seconds": 0.5})
    wav.write_bytes(wav.read_bytes()[:20])  # damaged
    assert not output_is_valid(wav, {"seconds": 1.0})

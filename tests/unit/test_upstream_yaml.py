"""Safe reading of upstream's HyperPyYAML cosyvoice3.yaml and writing our own in the same format."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from cosytune.errors import ConfigError
from cosytune.modeldir.presets import preset_hparams, preset_qwen2_config
from cosytune.modeldir.upstream_yaml import (
    CosyVoice3Hparams,
    TaggedNode,
    dump_cosyvoice3_yaml,
    load_upstream_yaml,
    parse_cosyvoice3_yaml,
)


def test_tags_are_recorded_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    text = f"""
seed: !apply:os.system ["touch {marker}"]
obj: !new:cosytune_no_such_module_xyz.Thing
    width: 3
fn: !name:another_missing_pkg.func
"""
    doc = load_upstream_yaml("t.yaml", text=text)
    assert not marker.exists()
    assert "cosytune_no_such_module_xyz" not in sys.modules and "another_missing_pkg" not in sys.modules
    assert isinstance(doc["seed"], TaggedNode) and doc["seed"].kind == "apply"
    assert doc["seed"].target == "os.system" and doc["seed"].args == [f"touch {marker}"]
    assert doc["obj"].target == "cosytune_no_such_module_xyz.Thing" and doc["obj"]["width"] == 3
    assert doc["fn"].kind == "name" and dict(doc["fn"]) == {}


def test_refs_arithmetic_paths_copies_and_yaml12_floats():
    text = """
chunk: 25
ratio: 2
base: /models
lr: 1e-5
eps: 1e-06
nested: {a: {b: 7}}
items: [10, 20]
product: !ref <chunk> * <ratio>
expr: !ref (<chunk> + 5) // <ratio> - 1
path: !ref <base>/BlankEN
deep: !ref <nested.a.b>
bracket: !ref <nested[a][b]>
second: !ref <items[1]>
same: !ref <nested>
copied: !copy <nested>
pair: !tuple (1, 2)
"""
    d = load_upstream_yaml("t.yaml", text=text)
    assert d["product"] == 50 and isinstance(d["product"], int)
    assert d["expr"] == 14
    assert d["path"] == "/models/BlankEN"
    assert d["deep"] == 7 and d["bracket"] == 7 and d["second"] == 20
    assert d["lr"] == 1e-5 and isinstance(d["eps"], float)
    assert d["same"] is d["nested"] and d["copied"] == d["nested"] and d["copied"] is not d["nested"]
    assert d["pair"] == (1, 2)


def test_overrides_apply_before_references():
    d = load_upstream_yaml("t.yaml", {"root": "/x"}, text="root: ''\ntok: !name:pkg.f\n    path: !ref <root>\n")
    assert d["tok"]["path"] == "/x"


@pytest.mark.parametrize("text, match", [
    ("a: !ref <missing>\n", "not a top-level key"),
    ("a: !ref <b>\nb: !ref <a>\n", "circular"),
    ("a: !include:other.yaml\n", "not supported"),
    ("a: !!python/object:os.system {}\n", "not supported"),
    ("a: [1, 2\n", "not valid"),
    ("- 1\n- 2\n", "mapping at the top level"),
])
def test_bad_files_are_clear_errors(text, match):
    with pytest.raises(ConfigError, match=match):
        load_upstream_yaml("bad.yaml", text=text)


@pytest.mark.parametrize("preset", ["tiny", "full"])
def test_dump_then_parse_roundtrip(preset):
    hp = preset_hparams(preset)
    text = dump_cosyvoice3_yaml(hp, header="hello")
    assert text.startswith("# hello")
    assert "!new:cosyvoice.llm.llm.CosyVoice3LM" in text and "!ref <chunk_size> * <token_mel_ratio>" in text
    assert parse_cosyvoice3_yaml("x.yaml", text=text, qwen2=preset_qwen2_config(preset)) == hp


def test_full_preset_equals_released_numbers():
    hp = preset_hparams("full")
    assert hp == CosyVoice3Hparams()
    assert (hp.llm.hidden_size, hp.flow.dit.dim, hp.flow.dit.depth, hp.hift.base_channels) == (896, 1024, 22, 512)
    assert hp.flow.dit.static_chunk_size == hp.chunk_size * hp.token_mel_ratio == 50


def test_non_default_values_survive_roundtrip():
    hp = preset_hparams("tiny")
    hp = dataclasses.replace(hp, flow=dataclasses.replace(
        hp.flow, dit=dataclasses.replace(hp.flow.dit, static_chunk_size=30, dropout=0.0, long_skip_connection=True)))
    assert parse_cosyvoice3_yaml("x.yaml", text=dump_cosyvoice3_yaml(hp), qwen2=hp.llm.qwen2) == hp


def _tiny_text() -> str:
    return dump_cosyvoice3_yaml(preset_hparams("tiny"))


def test_structure_problems_are_all_reported_at_once():
    text = (_tiny_text()
            .replace("!new:cosyvoice.flow.DiT.dit.DiT", "!new:cosyvoice.flow.decoder.ConditionalDecoder")
            .replace("    base_channels: 64", "    base_channels: wide\n    mystery_knob: 3")
            .replace("    speech_token_size: 6561\n", ""))
    with pytest.raises(ConfigError) as e:
        parse_cosyvoice3_yaml("bad.yaml", text=text, qwen2=preset_qwen2_config("tiny"))
    msg = str(e.value)
    assert "flow.decoder.estimator" in msg and "ConditionalDecoder" in msg
    assert "hift.base_channels: expected int" in msg
    assert "hift.mystery_knob: unknown argument" in msg
    assert "llm.speech_token_size: missing" in msg
    assert len(e.value.problems) == 4


def test_other_model_generations_are_refused():
    text = _tiny_text().replace("cosyvoice.llm.llm.CosyVoice3LM", "cosyvoice.llm.llm.Qwen2LM")
    with pytest.raises(ConfigError, match="not a CosyVoice 3 model"):
        parse_cosyvoice3_yaml("v2.yaml", text=text)
    with pytest.raises(ConfigError, match="llm: missing"):
        parse_cosyvoice3_yaml("x.yaml", text="sample_rate: 24000\nflow: 1\nhift: 2\n")


def test_inconsistent_numbers_are_refused():
    text = _tiny_text().replace("llm_output_size: 32", "llm_output_size: 64")
    with pytest.raises(ConfigError, match="llm_input_size 32 != llm_output_size 64"):
        parse_cosyvoice3_yaml("x.yaml", text=text)


def test_training_recipe_sections_read_as_data():
    """Other code (train config import) reads train_conf/batch as plain mappings from the same loader."""
    text = _tiny_text() + """
batch: !name:cosyvoice.dataset.processor.batch
    batch_type: 'dynamic'
    max_frames_in_batch: 2000
train_conf:
    optim: adam
    optim_conf:
        lr: 1e-5
"""
    d = load_upstream_yaml("x.yaml", text=text)
    assert isinstance(d["batch"], dict) and d["batch"]["max_frames_in_batch"] == 2000
    assert d["train_conf"]["optim_conf"]["lr"] == 1e-5
    assert parse_cosyvoice3_yaml("x.yaml", text=text, qwen2=preset_qwen2_config("tiny")) == preset_hparams("tiny")

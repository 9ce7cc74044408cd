"""cosytune doctor: environment report, and model-dir problems reported all at once."""

from __future__ import annotations

import json

from cosytune.cli.main import main


def test_doctor_environment_report(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for title in ("Python and torch", "onnxruntime", "audio decoding", "packages"):
        assert f"== {title}" in out
    assert "CPUExecutionProvider" in out and "mp3" in out
    assert "cuda" in out  # CUDA is reported (available or why not)


def test_doctor_json_and_missing_model_dir_files(tmp_path, capsys):
    (tmp_path / "llm.pt").write_bytes(b"")
    (tmp_path / "cosyvoice3.yaml").write_text("llm: [1, 2\n")
    assert main(["doctor", "--model_dir", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    model = report["sections"][-1]
    by_name = {c["name"]: c for c in model["checks"]}
    assert by_name["cosyvoice3.yaml"]["level"] == "error" and "MALFORMED" in by_name["cosyvoice3.yaml"]["detail"]
    assert "MALFORMED" in by_name["llm.pt"]["detail"] and "empty" in by_name["llm.pt"]["detail"]
    for name in ("flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx", "CosyVoice-BlankEN/"):
        assert "MISSING" in by_name[name]["detail"], name
    assert by_name["spk2info.pt"]["level"] == "info"
    assert report["errors"] == 7


def test_doctor_estimates_the_disk_a_training_run_needs(tmp_path, capsys):
    (tmp_path / "llm.pt").write_bytes(b"\0" * 4096)
    main(["doctor", "--model_dir", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    disk = {c["name"]: c for c in report["sections"][-1]["checks"]}["disk for training"]
    assert disk["level"] == "ok" and "GiB free" in disk["detail"] and "resume state" in disk["detail"]

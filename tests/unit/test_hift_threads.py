"""The vocoder is shared by concurrent requests (threads of ``cosytune serve``): its float64 f0 predictor must
not let one call see another call's temporarily swapped-in parameters."""

from __future__ import annotations

import threading

import torch

from cosytune.models.hift import HiFTConfig, HiFTGenerator


def test_f0_prediction_is_safe_from_concurrent_threads():
    hift = HiFTGenerator(HiFTConfig.tiny()).eval()
    mel = torch.randn(1, HiFTConfig.tiny().in_channels, 40, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = hift._predict_f0(mel, True)
    errors: list[str] = []
    results: list[torch.Tensor] = []

    def work() -> None:
        try:
            for _ in range(40):
                with torch.inference_mode():
                    results.append(hift._predict_f0(mel, True))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert len(results) == 320 and all(torch.equal(r, want) for r in results)
    assert all(p.dtype == torch.float32 for p in hift.f0_predictor.parameters())  # the module itself is untouched

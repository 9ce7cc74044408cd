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


def test_whole_vocoder_calls_from_concurrent_threads_equal_serial_calls():
    """No lock anywhere on the eager path (``Synthesizer`` only serialises its graphed vocoder): threads sharing
    one HiFT, each vocoding its own mel (whole and non-final chunks), get what they get alone."""
    hift = HiFTGenerator(HiFTConfig.tiny()).eval()
    g = torch.Generator().manual_seed(1)
    mels = [torch.randn(1, HiFTConfig.tiny().in_channels, 12 + 5 * i, generator=g) for i in range(4)]
    with torch.inference_mode():
        want = [(hift.inference(m).wav, hift.inference(m, finalize=False).wav) for m in mels]
    got: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(len(mels))}
    errors: list[str] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                with torch.inference_mode():
                    got[i].append((hift.inference(mels[i]).wav, hift.inference(mels[i], finalize=False).wav))
        except Exception as e:  # noqa: BLE001 - collected and reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(mels))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
    assert all(len(got[i]) == 3 and all(torch.equal(a, want[i][0]) and torch.equal(b, want[i][1]) for a, b in got[i])
               for i in range(len(mels)))

"""Thread safety of capture: threads that call one adapted model with new argument signatures at the same time.

``torch.export`` keeps process-global state (its fake-mode stack, the patches of non-strict tracing): before
``fxpeft.capture.export.CAPTURE_LOCK``, four threads capturing at once failed with "Trying to pop empty mode
stack" and "CURRENT_PATCHER is None". The contract (README, "What fxpeft guarantees"): captures and rewrites run one
at a time, each signature is captured once whichever thread asks first, and every thread gets the outputs a
sequential call gives.
"""

from __future__ import annotations

import threading

import torch

import fxpeft
from tests.models import hf_inputs, hf_model


def test_threads_capturing_new_signatures_at_once_get_sequential_outputs():
    adapted = fxpeft.transform(hf_model("llama"), [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=2)]).eval()
    inputs = hf_inputs("llama", batch=2, seq=6)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    calls = [{"input_ids": ids}, {"input_ids": ids, "labels": ids}, {"input_ids": ids, "attention_mask": mask},
             {"input_ids": ids, "attention_mask": mask, "labels": ids}]
    known = len(adapted.programs())
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def call(index: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                results[index] = adapted(**calls[index]).logits
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=call, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(adapted.programs()) <= known + len(calls)  # each signature captured once
    with torch.no_grad():
        for index, kwargs in enumerate(calls):
            assert torch.equal(results[index], adapted(**kwargs).logits)
    assert not any(thread.is_alive() for thread in threads)

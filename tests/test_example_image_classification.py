"""``examples/image_classification.py`` runs end to end as a user runs it: a small ViT pretrained on the digits 0-4,
adapted with LoRA on its attention plus a trainable head to the digits 5-9, saved and reloaded."""

from __future__ import annotations

import re

from tests.test_examples import ROOT, _assert_fine_tuned, _run_quick

IMAGE_CLASSIFICATION = ROOT / "examples" / "image_classification.py"


def test_image_classification_quick_run_learns_saves_and_reloads(tmp_path):
    """``--quick`` pretrains the backbone, then LoRA (q_proj, v_proj) and the new head lift held-out accuracy from
    chance to at least 0.75; the adapter is small, in PEFT's layout, and a fresh base model with it reloaded (by
    fxpeft, and by PEFT) predicts exactly as the trained model (about 12 s of one CPU core)."""
    import sklearn.datasets  # noqa: F401  (the data set; a missing one fails, never skips)
    import tqdm  # noqa: F401  (the `examples` extra)

    adapter, base = tmp_path / "adapter", tmp_path / "base"
    output = _run_quick(IMAGE_CLASSIFICATION, "--out", str(adapter), "--base-out", str(base))

    # Seeds 0-3 went from 0.233, 0.197, 0.090, 0.243 (a random head, five classes) to 0.913, 0.963, 0.943, 0.947.
    _assert_fine_tuned(output, adapter, "trainable params: 4,421 || all params: 73,290")
    assert "PEFT's PeftModel.from_pretrained on the same folder: identical predictions" in output, output
    assert re.search(r"held-out images right, per digit: 5: \d+/\d+, 6: .*, 9: \d+/\d+", output), output

    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    base_bytes = (base / "model.safetensors").stat().st_size
    assert adapter_bytes < 50_000 and adapter_bytes < base_bytes / 10, (adapter_bytes, base_bytes)
    assert (base / "config.json").is_file()

"""Accelerate's FSDP2 preparation of an fxpeft-adapted model on 2 gloo ranks (issue 19 item 4).

``tests/distributed/ranks/accelerate_fsdp2.py`` runs ``Accelerator.prepare`` down its FSDP2 path (forced on this CPU
host, see its docstring): Accelerate shards the decoder layers (found through ``AdaptedModel._no_split_modules``), the
input embeddings and the head on their own, then the root. fxpeft runs the layers as gathered regions and gathers the
embeddings and head for the whole call; training equals one process.
"""

from __future__ import annotations

import pytest

from tests.distributed.launch import run_ranks


def test_accelerate_fsdp2_plugin_shards_per_layer_and_trains_as_one_process(tmp_path):
    results = run_ranks("accelerate_fsdp2.py", str(tmp_path / "model"), timeout=170)
    for result in results:
        assert result["sharded_layers"] == ["lm_head", "model.embed_tokens", "model.layers.0", "model.layers.1"]
        assert result["root_sharded"]
        assert result["base_fraction"] == 0.5
        assert result["losses"] == pytest.approx(result["expected_losses"], rel=1e-6, abs=1e-6)
        assert result["adapter_difference"] <= 1e-6

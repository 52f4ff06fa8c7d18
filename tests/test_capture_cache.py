"""The capture cache on disk (fxpeft/capture/disk_cache.py): a second process loads the capture instead of exporting,
with outputs and gradients equal to a fresh capture's bit for bit; entries that are corrupt, stale (another key
inside) or that do not fit the model's weights are captured again and overwritten, never used; the cache turned off
writes nothing; models transformed with different rules share one entry; a folder that cannot be written only warns.

Every test points ``FXPEFT_CACHE`` at its own ``tmp_path`` (the user's cache is never touched).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxpeft
from fxpeft.capture import disk_cache
from fxpeft.capture.export import capture
from fxpeft.capture.graph_codec import decode_program, encode_program
from fxpeft.debug import counting
from tests.models import hf_model

_ROOT = Path(__file__).resolve().parent.parent


class _Tiny(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 16):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _example(width: int = 8) -> dict[str, torch.Tensor]:
    return {"x": torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))}


def _run(program, model: nn.Module) -> torch.Tensor:
    """The captured graph of ``model`` run on the example, fed from the model's tensors as Program's sources say."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    inputs = [tensors[source.target] if source.kind in ("parameter", "buffer") else _example()["x"]
              for source in program.sources]
    return program.graph_module(*inputs)[0]


def _fits(program, model: nn.Module) -> bool:
    return torch.equal(_run(program, model), model(**_example()))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FXPEFT_CACHE", str(folder))
    disk_cache.set_capture_cache(None)
    yield folder
    disk_cache.set_capture_cache(None)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.fxcapture")) if folder.exists() else []


def _outputs_and_grads() -> dict[str, torch.Tensor]:
    """The tiny llama with LoRA (B != 0): logits and every adapter gradient of one training step."""
    model = hf_model("llama")
    ids = torch.arange(14).reshape(2, 7) % 100
    adapted = fxpeft.transform(model, fxpeft.LoRA(targets=["q_proj", "v_proj"], r=4, alpha=8),
                               example_kwargs={"input_ids": ids, "labels": ids})  # one signature, one capture
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in adapted.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.1)
    out = adapted(input_ids=ids, labels=ids)
    out.loss.backward()
    return {"logits": out.logits.detach(),
            **{f"grad.{name}": parameter.grad for name, parameter in adapted.named_parameters()
               if parameter.requires_grad}}


def _child(path: str) -> None:
    """Run in a fresh process: write the outputs and gradients to ``path``, the cache counters to stdout."""
    with counting() as counts:
        tensors = _outputs_and_grads()
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path)
    print(json.dumps({"/".join(key): value for key, value in counts.items() if key[0] == "capture_cache"}))


def test_second_process_loads_the_capture_with_equal_outputs_and_gradients(cache, tmp_path):
    with counting() as counts:
        fresh = _outputs_and_grads()  # captured here and stored
    assert counts["capture_cache", "miss"] == 1 and counts["capture_cache", "stored"] == 1
    entries = _entries(cache)
    written = [entry.stat().st_mtime_ns for entry in entries]

    out = tmp_path / "child.safetensors"
    env = {**os.environ, "FXPEFT_CACHE": str(cache), "PYTHONPATH": str(_ROOT)}
    code = f"from tests.test_capture_cache import _child; _child({str(out)!r})"
    result = subprocess.run([sys.executable, "-c", code],
                            cwd=_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    child_counts = json.loads(result.stdout.strip().splitlines()[-1])
    assert child_counts == {"capture_cache/hit": 1}  # loaded, not exported, not stored again
    assert _entries(cache) == entries and [entry.stat().st_mtime_ns for entry in entries] == written
    loaded = load_file(out)
    assert loaded.keys() == fresh.keys()
    for name, tensor in fresh.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "falcon", "bert"])
def test_codec_round_trip_gives_the_same_graph(family, cache, fresh_capture):
    """Encoding and decoding keeps the code, the sizes (symbolic ones too), the module stacks and the constants."""
    _, program = fresh_capture(family)
    data, constants = encode_program(program)
    again = decode_program(json.loads(json.dumps(data)), constants, kwarg_names=program.kwarg_names,
                           fixed_kwargs=program.fixed_kwargs, device=program.device)
    assert again.graph_module.code == program.graph_module.code
    assert again.sources == program.sources and again.in_spec == program.in_spec and again.out_spec == program.out_spec
    assert again.constants.keys() == program.constants.keys()
    assert all(torch.equal(again.constants[name], tensor) for name, tensor in program.constants.items())
    for old, new in zip(program.graph.nodes, again.graph.nodes):
        assert old.meta.get("nn_module_stack") == new.meta.get("nn_module_stack"), old.name
        value, decoded = old.meta.get("val"), new.meta.get("val")
        if isinstance(value, torch.Tensor):
            assert (str(decoded.shape), str(decoded.stride()), decoded.dtype) == \
                   (str(value.shape), str(value.stride()), value.dtype), old.name
        else:
            assert str(decoded) == str(value), old.name


def test_corrupt_entry_is_captured_again_and_overwritten(cache):
    model = _Tiny()
    capture(model, _example())
    (entry,) = _entries(cache)
    key = _key_inside(entry)
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])  # a write cut short
    with counting() as counts:
        program = capture(model, _example())
    assert counts["capture_cache", "rejected"] == 1 and counts["capture_cache", "stored"] == 1
    assert counts["capture_cache", "hit"] == 0
    assert _fits(program, model) and _key_inside(entry) == key  # overwritten by a whole entry
    with counting() as counts:
        assert _fits(capture(model, _example()), model)
    assert counts["capture_cache", "hit"] == 1


def test_stale_entry_with_another_key_inside_is_captured_again(cache, caplog):
    model, other = _Tiny(), _Tiny()
    other.up.weight.requires_grad_(False)  # another key
    capture(model, _example())
    (entry,) = _entries(cache)
    capture(other, _example())
    (stale,) = set(_entries(cache)) - {entry}
    key = _key_inside(entry)
    entry.write_bytes(stale.read_bytes())  # the file name of one key, another key inside
    with counting() as counts, caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(model, _example())
    assert "its key differs" in caplog.text
    assert counts["capture_cache", "rejected"] == 1 and counts["capture_cache", "stored"] == 1
    assert _key_inside(entry) == key and _fits(program, model)


def test_entry_that_does_not_fit_the_weights_is_never_used(cache, caplog):
    small, large = _Tiny(hidden=16), _Tiny(hidden=32)
    with counting() as counts:
        capture(small, _example())
        (small_entry,) = _entries(cache)
        capture(large, _example())  # other shapes: another key, a miss
    assert counts["capture_cache", "miss"] == 2 and counts["capture_cache", "hit"] == 0
    (large_entry,) = set(_entries(cache)) - {small_entry}
    # The large model's key, the small model's program inside: the key check passes, the placeholder check must not.
    _rewrite_key(small_entry, large_entry, _key_inside(large_entry))
    with counting() as counts, caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(large, _example())
    assert "parameter up.weight is (32, 8)" in caplog.text
    assert counts["capture_cache", "rejected"] == 1 and counts["capture_cache", "stored"] == 1
    assert _fits(program, large)


def _key_inside(path: Path) -> str:
    return _metadata(path)["key"]


def _metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length])["__metadata__"]


def _rewrite_key(source: Path, target: Path, key: str) -> None:
    """Write ``source``'s program into ``target`` under ``key``: a valid file whose placeholders are another model's."""
    save_file(load_file(source), str(target), metadata={**_metadata(source), "key": key})


def test_entry_calling_a_function_outside_the_allow_list_is_rejected(cache, tmp_path, caplog):
    model = _Tiny()
    capture(model, _example())
    (entry,) = _entries(cache)
    metadata = _metadata(entry)
    data = json.loads(metadata["program"])
    marker = tmp_path / "ran"
    node = next(node for node in data["nodes"] if node[1] == "call_function")
    node[2] = "py:os.system"  # never resolved: only torch.ops overloads and a fixed list of functions are
    node[3] = [f"touch {marker}"]
    save_file({}, str(entry), metadata={**metadata, "program": json.dumps(data)})
    with counting() as counts, caplog.at_level(logging.DEBUG, logger="fxpeft"):
        program = capture(model, _example())
    assert "'os.system' is not allowed" in caplog.text
    assert counts["capture_cache", "rejected"] == 1 and not marker.exists() and _fits(program, model)


@pytest.mark.parametrize("how", ["env", "function"])
def test_cache_off_writes_nothing(how, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if how == "env":
        monkeypatch.setenv("FXPEFT_CACHE", "off")
    else:
        monkeypatch.delenv("FXPEFT_CACHE", raising=False)
        disk_cache.set_capture_cache(False)
    try:
        with counting() as counts:
            fxpeft.transform(_Tiny(), fxpeft.LoRA(targets=["up"], r=2), example_kwargs=_example())
    finally:
        disk_cache.set_capture_cache(None)
    assert not any(key[0] == "capture_cache" for key in counts)
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_default_folder_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("FXPEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert disk_cache.cache_folder() == tmp_path / "fxpeft" / "captures"
    monkeypatch.setenv("FXPEFT_CACHE", "0")
    assert disk_cache.cache_folder() is None


def test_models_with_different_rules_share_one_entry(cache):
    first = fxpeft.transform(_Tiny(), fxpeft.LoRA(targets=["up"], r=2), example_kwargs=_example())
    with counting() as counts:
        second = fxpeft.transform(_Tiny(), [fxpeft.LoRA(targets=["down"], r=4), fxpeft.Trainable(["up"])],
                                  example_kwargs=_example())
    assert counts["capture_cache", "hit"] == 1 and len(_entries(cache)) == 1
    assert first.programs()[0].graph_module.code != second.programs()[0].graph_module.code


def test_unwritable_folder_warns_once_and_captures(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FXPEFT_CACHE", str(blocker / "cache"))  # a folder inside a file: every write fails
    monkeypatch.setattr(disk_cache, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capture(_Tiny(), _example())
        capture(_Tiny(16), _example(16))
    assert len([w for w in caught if "capture cache" in str(w.message)]) == 1


def test_model_with_forward_hooks_is_not_cached(cache):
    model = _Tiny()
    model.up.register_forward_hook(lambda module, args, out: out * 2)
    with counting() as counts:
        capture(model, _example())
    assert counts["capture_cache", "unkeyable"] == 1 and not _entries(cache)

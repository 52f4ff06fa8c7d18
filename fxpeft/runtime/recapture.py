"""What :class:`fxpeft.AdaptedModel` does when its graphs no longer fit the model or cannot travel with it: dtype
casts and pickling. :class:`RecaptureMethods` is a mixin of the adapted model (it reads its programs and adapters).

**Casts.** A graph is captured for the dtypes the model had: export bakes dtype-dependent constants and casts into it
(RMSNorm's ``to(float32)`` and back, a mask's ``finfo(dtype).min``, identity casts dropped), so after ``.half()``,
``.bfloat16()``, ``.float()``, ``.double()`` or ``.to(dtype)`` each signature is captured again, from a call like the
one it was captured with (:func:`fxpeft.graph.examples.call_example`, floating inputs in the model's new dtype), and
rewritten by the same rules with the same adapter tensors: nothing is initialised again. Calls passing floating inputs
of another dtype are other signatures (:func:`fxpeft.graph.program.signature_key`), captured on their first call. A
move to another device (``.to("cuda")``) keeps the graphs: their device constants are retargeted on the next call
(``Program.module_for``).

**Pickling** (``torch.save(adapted)``, ``pickle.dumps``, ``multiprocessing``) writes everything but the graphs, which
hold what does not pickle (export's tracer in node metadata) and fake tensors that a later rewrite reads: each
signature is written as its example call instead (a few small tensors), and unpickling captures them again, so a
loaded model runs, rewrites and compiles at once. That costs what ``transform`` costs per signature captured: measured
here (2 shared CPU cores), ``pickle.loads`` of a tiny 2-layer llama with LoRA and one signature takes 1.6-2.1 s
against ~0.005 s for the base model alone; with the two KV-cache signatures a ``generate`` adds, ~5.8 s
(``tests/test_pickle.py`` prints the first). A cast costs the same captures (~2 s and ~9.6 s). ``copy.deepcopy``
copies the graphs instead, capturing nothing (~0.08 s).
"""

from __future__ import annotations

import collections
import copy
import itertools
from typing import Any

import torch

from fxpeft.capture.export import CAPTURE_LOCK, device_of
from fxpeft.graph.examples import call_example
from fxpeft.shared_tensors import track

__all__ = ["RecaptureMethods"]

_EXAMPLES = "_fxpeft_signature_examples"  # the pickled state's example calls, one per captured signature


def _dtypes(model: torch.nn.Module) -> tuple[torch.dtype, ...]:
    return tuple(tensor.dtype for tensor in itertools.chain(model.parameters(), model.buffers()))


def _main_float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The floating dtype most of ``model``'s parameters have (None without floating parameters)."""
    counts = collections.Counter(p.dtype for p in model.parameters() if p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else None


class RecaptureMethods:
    """Casts that capture the graphs again (``_apply``), and pickling without the graphs (``__getstate__`` /
    ``__setstate__``); ``copy.deepcopy`` copies them (``__deepcopy__``). See the module docstring."""

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()``, ``.bfloat16()``, ``.float()``, ``.double()``, ``.to(device)``, ``.cuda()``:
        the base model is moved and cast exactly as it would be alone, so with adapters disabled the outputs are
        the cast base model's bit for bit.

        Adapter tensors move with it and take fxpeft's adapter dtype (``fxpeft.adapters.adapter_dtype``) of the new
        base dtype: float32 over a float16 or bfloat16 base, the base's dtype otherwise; a trained copy of a base
        tensor (``Trainable``, LoRA's ``bias``) takes the base's dtype. They are converted from their own values, so
        float32 adapters stay exactly as they were through ``.half()`` and back. That is what PEFT gives for a base
        cast *before* ``get_peft_model`` (``autocast_adapter_dtype=True``, its default), and the LoRA branch computes
        as PEFT's: ``x`` cast to the adapter's dtype, ``y + B(A(x)) * scaling`` added in the promoted dtype and cast
        back to ``y``'s. PEFT's ``peft_model.half()`` *after* ``get_peft_model`` is a plain ``nn.Module`` cast that
        makes float16 adapters, which train poorly; fxpeft keeps them in float32 instead.

        When a dtype changed, every captured signature is captured again (see the module docstring): about what
        ``transform`` took per signature. A device move alone captures nothing."""
        before, main = _dtypes(self), _main_float_dtype(self.base_model)
        result = super()._apply(fn, recurse)
        if "_programs" in self.__dict__ and _dtypes(self) != before:
            now = _main_float_dtype(self.base_model)
            self._capture_again(self._signature_examples({main: now} if main != now else {}))
        return result

    def _signature_examples(self, dtypes: dict[torch.dtype, torch.dtype]) -> list[dict[str, Any]]:
        """A call like each captured signature's, on the model's device, floating inputs cast by ``dtypes``."""
        device = device_of(self.base_model)
        examples = (call_example(program, device, dtypes) for program in self._programs.values())
        return [example for example in examples if example is not None]

    def _capture_again(self, examples: list[dict[str, Any]]) -> None:
        """Replace the programs by fresh captures of ``examples``, rewritten with the adapters as they are (merged
        ones too). A capture that fails leaves the signatures before it captured; later calls capture their own."""
        programs: dict[tuple, Any] = {}
        with CAPTURE_LOCK:
            try:
                for example in examples:
                    program = self._build_program(example)
                    if self._merged:
                        program.prepare_merged()
                    programs[program.key] = program
            finally:
                self._programs = programs

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the captured graphs; each signature as an example call to capture again on unpickling."""
        state = super().__getstate__()
        state["_programs"] = {}
        state[_EXAMPLES] = self._signature_examples({})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore the state and capture every signature again (see the module docstring for the cost)."""
        state = dict(state)
        examples = state.pop(_EXAMPLES, [])
        super().__setstate__(state)
        self._capture_again(examples)
        track(self)

    def __deepcopy__(self, memo: dict) -> Any:
        """A deep copy of everything, the captured graphs included (nothing is captured again)."""
        copied = object.__new__(type(self))
        memo[id(self)] = copied
        super(RecaptureMethods, copied).__setstate__(copy.deepcopy(super().__getstate__(), memo))
        return copied

"""fxpeft: parameter-efficient fine-tuning as a graph rewrite.

Capture a model as a ``torch.fx`` graph, select sites with declarative rules, rewrite them (LoRA branches,
trainable copies), and run the result as an ordinary ``nn.Module`` that ``torch.compile`` takes whole::

    import fxpeft
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)])
    adapted.print_trainable_parameters()
    adapted.save_adapter("out/")                  # PEFT's on-disk layout
    again = fxpeft.load_adapter(fresh_model, "out/")
    again = fxpeft.AutoAdapterModel.from_pretrained("out/")   # its base model too (a local folder)

The pipeline, one package per stage: :mod:`fxpeft.capture` -> :mod:`fxpeft.graph` (graph facts and selection) ->
:mod:`fxpeft.rewrite` (methods, registered in :mod:`fxpeft.methods`; built-in ones in :mod:`fxpeft.passes`) ->
:mod:`fxpeft.runtime` (eval twin, mixed batches, shared layers); :mod:`fxpeft.formats` (PEFT's files) and
:mod:`fxpeft.verification` read what those produce. :mod:`fxpeft.debug` says why a pattern matched or not.
"""

from fxpeft import debug, errors, methods
from fxpeft.api import load_adapter, transform
from fxpeft.auto import AutoAdapterModel
from fxpeft.model import AdaptedModel
from fxpeft.rules import LoRA, PrefixTuning, PromptTuning, PTuning, Quantize, Rule, Trainable
from fxpeft.verification import Finding, Report, verify

__version__ = "0.1.0"


def __getattr__(name: str):
    """The rule type of a method registered by a plugin (``fxpeft.IA3`` for a rule class ``IA3`` that a module in
    ``passes/`` registers), found through the method registry, so that a plugin's rule needs no other wiring."""
    for method in methods.methods():
        if method.rule_type.__name__ == name:
            return method.rule_type
    raise AttributeError(f"module 'fxpeft' has no attribute {name!r}")

__all__ = ["transform", "load_adapter", "verify", "AdaptedModel", "AutoAdapterModel", "LoRA", "Trainable",
           "PromptTuning", "PTuning", "PrefixTuning", "Quantize", "Rule", "Report", "Finding", "errors", "debug",
           "methods", "__version__"]

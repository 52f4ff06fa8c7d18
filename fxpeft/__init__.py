"""fxpeft: parameter-efficient fine-tuning as a graph rewrite.

Capture a model as a ``torch.fx`` graph, select sites with declarative rules, rewrite them (LoRA branches,
trainable copies), and run the result as an ordinary ``nn.Module`` that ``torch.compile`` takes whole::

    import fxpeft
    adapted = fxpeft.transform(model, [fxpeft.LoRA(targets=["q_proj", "v_proj"], r=8, alpha=16)])
    adapted.print_trainable_parameters()
    adapted.save_adapter("out/")                  # PEFT's on-disk layout
    again = fxpeft.load_adapter(fresh_model, "out/")

The pipeline, one package per stage: :mod:`fxpeft.capture` -> :mod:`fxpeft.graph` (graph facts and selection) ->
:mod:`fxpeft.rewrite` (methods, registered in :mod:`fxpeft.methods`; built-in ones in :mod:`fxpeft.passes`) ->
:mod:`fxpeft.runtime` (eval twin, mixed batches, shared layers); :mod:`fxpeft.formats` (PEFT's files) and
:mod:`fxpeft.verification` read what those produce. :mod:`fxpeft.debug` says why a pattern matched or not.
"""

from fxpeft import debug, errors, methods
from fxpeft.api import load_adapter, transform
from fxpeft.model import AdaptedModel
from fxpeft.rules import LoRA, PrefixTuning, PromptTuning, PTuning, Quantize, Rule, Trainable
from fxpeft.verification import Finding, Report, verify

__version__ = "0.1.0"

__all__ = ["transform", "load_adapter", "verify", "AdaptedModel", "LoRA", "Trainable", "PromptTuning", "PTuning",
           "PrefixTuning", "Quantize", "Rule", "Report", "Finding", "errors", "debug", "methods", "__version__"]

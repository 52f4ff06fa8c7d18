"""Verification: an adapted model is its base model plus its declared adapters, and nothing else.

:func:`verify` compares a trained adapter (an :class:`~fxpeft.AdaptedModel` in memory, or an adapter folder
in PEFT's layout) with its base model and returns a :class:`Report`: a list of :class:`Finding` s, with
``report.ok``, ``report.summary()`` and ``report.to_json()``. ``fxpeft check BASE ADAPTER`` runs the same
check from the command line (:mod:`fxpeft.cli`)::

    report = fxpeft.verify(AutoModelForCausalLM.from_pretrained("base/"), "out/adapter")
    print(report.summary())
    assert report.ok, report.to_json()

The checks (one module each), and the kind of finding each reports::

    adapter tensors (tensors.py)   the adapter holds what its config declares, in shapes that fit the base
      not-adapter-key          a key that is no adapter tensor PEFT's layout knows
      undeclared-site          an adapter tensor, node or input at a site the config does not declare
      unknown-site             an adapter tensor for a module the base model does not have
      targets-unmatched        the config's target_modules select nothing in the base model
      adapter-key-missing      a tensor the config declares is not there
      adapter-shape-mismatch   a tensor's shape does not fit the base model (made for another base?)
      config-mismatch          the config disagrees with the tensors (its rank against the tensors', ...)
      adapter-nonfinite        NaN or Inf in an adapter tensor
    declared rules (policy.py)     with ``rules=`` / ``--rules``
      rules-violation          the adapter holds something the declared rules do not allow
    graph structure (structure.py) the adapted graph minus its adapter nodes is the base graph, node for node
                                   (virtual tokens: the base graph on the sequence they lengthen, graph_view.py)
      extra-op                 an op that is neither the base model's nor an adapter's
      base-op-replaced         a base op computes something else
      base-op-missing          a base op has no counterpart
      base-op-rewired          a base op reads other values than in the base graph (its data flow changed)
      adapter-not-additive     an adapter's result reaches base ops other than through its join
      adapter-misplaced        an adapter's join is on another module's output than its site's
    base weights (weights.py)      every base tensor the adapted model reads hashes equal to the base model's
      base-weight-changed      a tensor's bytes (or shape) differ
      base-weight-missing      the adapted model reads a tensor the base model does not have
    behaviour (behaviour.py)       on probe inputs (probes.py)
      disabled-output-differs  adapters disabled, an output is not the base model's bit for bit
      merged-output-differs    merged, an output is farther from the unmerged one than the tolerance
      merge-failed             merge() or unmerge() raised
    behaviour of virtual tokens (virtual.py)   prompt, P-tuning and prefix tuning, which cannot be disabled: the
                                   other adapters as above, on a copy of the base; then the base model (merged with
                                   them) called with the file's virtual tokens as PEFT calls it
      virtual-output-differs   an output is farther from that reference's than the rounding tolerance
    skipped                        (a note, never a failure) a check that could not run here, and why

What is method-specific comes from the method registry (:mod:`fxpeft.methods`): what a file key names
(``key_part``), which modules a method can adapt (``describe_site``), what a declared rule allows
(``allowed_sites``, ``policy_findings``); the graph checks read the node tags (:mod:`fxpeft.graph.tags`).
The reference for everything is what the declared rules build on a fresh capture of the base model
(:mod:`~fxpeft.verification.declared`); how graphs are matched is in :mod:`~fxpeft.verification.compare`.
"""

from fxpeft.verification.compare import Comparison, compare_views
from fxpeft.verification.graph_view import GraphView
from fxpeft.verification.report import Check, Finding, Report
from fxpeft.verification.run import verify

__all__ = ["verify", "Report", "Finding", "Check", "GraphView", "Comparison", "compare_views"]

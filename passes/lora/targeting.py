"""PEFT's targeting rules shared by the LoRA-like methods (LoRA, LoHa/LoKr, VeRA): which selected sites a rule keeps
(``layers_to_transform``, never inside a module trained whole) and which biases its ``bias`` field trains.

PEFT applies these in ``BaseTuner`` for every tuner alike; here they are one module the passes call, so that the
methods cannot drift apart.
"""

from __future__ import annotations

from fxpeft.errors import NoMatchError
from fxpeft.rewrite import RewriteContext
from fxpeft.rules import Trainable

__all__ = ["trained_whole", "inside", "narrow", "train_biases"]


def trained_whole(ctx: RewriteContext) -> list[str]:
    """Module paths that a Trainable rule of this adapter trains whole (PEFT's ``modules_to_save``)."""
    return [path for other in ctx.adapter.rules if isinstance(other, Trainable) for path in ctx.select_modules(other)]


def inside(path: str, modules: list[str]) -> bool:
    """Whether ``path`` is one of ``modules`` or inside one of them."""
    return any(path == module or path.startswith(module + ".") for module in modules)


def narrow(rule, ctx: RewriteContext, sites: list, trained: list[str]) -> list:
    """The selected sites minus those outside ``rule.layers`` and those inside a module trained whole (PEFT never
    puts an adapter inside a ``modules_to_save`` module). A site whose whole path is one of the targets is kept
    whatever ``layers`` says, as PEFT's ``check_target_module_exists`` keeps a key given in full. The kept paths
    become the rule's ``adapter.selected``; NoMatchError when none is left."""
    literal = {target for target in rule.targets if isinstance(target, str)} \
        if isinstance(rule.targets, (list, tuple)) else set()
    kept = [site for site in sites if (site.path in literal or rule.selects_layer(site.path))
            and not inside(site.path, trained)]
    if not kept:
        raise NoMatchError(
            f"{type(rule).__name__}: targets {rule.targets!r} selected {[s.path for s in sites][:6]}, but none is "
            f"left after layers={list(rule.layers) if rule.layers else None} (layers_pattern={rule.layers_pattern!r}) "
            f"and without the modules trained whole {trained}. Check `layers` / `layers_pattern`: the layer index is "
            "the number after the pattern's name in the module path.",
            candidates=[site.path for site in sites][:8])
    if len(kept) != len(sites):
        ctx.adapter.selected[rule] = [site.path for site in kept]
    return kept


def train_biases(rule, ctx: RewriteContext, adapted: set[str], trained: list[str]) -> None:
    """PEFT's ``bias`` field: ``"none"`` trains none; ``"all"`` every bias; any other value (``"lora_only"``,
    ``"vera_only"``) the biases of the ``adapted`` modules. Biases of modules trained whole are their Trainable
    rule's already. A trained bias is a copy the adapter owns, saved as PEFT names it (``<module>.base_layer.bias``
    for an adapted module's)."""
    if rule.bias == "none":
        return
    for source in list(ctx.program.sources):
        # PEFT's test for a bias is the parameter's own name, ``bias`` (not ``final_logits_bias``).
        if source.kind != "parameter" or source.target.rpartition(".")[2] != "bias":
            continue
        owner = source.target.rpartition(".")[0]
        if inside(owner, trained):
            continue
        if owner in adapted:
            ctx.train_copy(source.target, peft_name=f"{owner}.base_layer.bias", shadows=True)
        elif rule.bias == "all":
            ctx.train_copy(source.target, peft_name=source.target, shadows=True)

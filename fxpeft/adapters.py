"""Adapter parameters: owned by fxpeft, grouped by adapter name, keyed by site — never in the base model.

An :class:`Adapter` holds the rules it was made from and one module per site. Every site module follows
the small :class:`SiteModule` protocol, so the adapter state dict is *read from this registry* and never
found by filtering parameter names.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import torch
from torch import nn

from fxpeft.capture.export import device_of
from fxpeft.errors import AdapterLoadError, UnsupportedError
from fxpeft.formats.files import check_state_fits
from fxpeft.rules import Rule

__all__ = ["SiteModule", "CachedTokens", "Adapter", "ParameterCopy", "site_key", "init_like_linear", "adapter_dtype"]


@torch.no_grad()
def init_like_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """``nn.Linear``'s default initialisation (what PEFT's encoders get): kaiming-uniform weight, uniform bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype of adapter parameters next to base tensors of ``base_dtype``: float32 over half precision and over
    quantized (integer) weights, as PEFT's ``autocast_adapter_dtype=True`` keeps them; else the base's own."""
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) or not base_dtype.is_floating_point \
        else base_dtype


def _as_adapter_move(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (what ``nn.Module._apply`` applies: ``.to()``, ``.half()``, ``.cuda()``, ...) as it applies to an
    adapter tensor: moved where ``fn`` moves it and, when ``fn`` changes its floating dtype, given
    :func:`adapter_dtype` of the dtype ``fn`` gives (the base model's new dtype), converted from the tensor itself so
    that a dtype the policy keeps loses no precision (float32 stays float32 through ``.half()``)."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        moved = fn(tensor)
        if not tensor.is_floating_point() or moved.dtype == tensor.dtype:
            return moved
        return tensor.to(device=moved.device, dtype=adapter_dtype(moved.dtype))

    return move


@dataclasses.dataclass(frozen=True)
class CachedTokens:
    """A site's virtual tokens as a call with a KV cache takes them (:meth:`SiteModule.cached_tokens`).

    A graph captured with a cache leaves virtual tokens out (:mod:`fxpeft.runtime.virtual_tokens` puts them in the
    cache once, before the first token). Exactly one of ``embeddings`` and ``keys_values`` is given, as a function
    called only when the cache is filled (every decode step reads ``count`` alone):

    ``embeddings``: ``[count, hidden]`` rows in front of the token embeddings (prompt tuning, P-tuning). For a
        decoder, the model runs on them once to fill the cache; for an encoder-decoder they are the encoder's (its
        graph adds them), and the decoder's calls see ``count`` more encoder positions.
    ``keys_values``: per cache layer, ``(keys, values)`` of shape ``[kv_heads, count, head_dim]`` (prefix tuning),
        put in the self-attention cache as they are.
    """

    count: int
    embeddings: Callable[[], torch.Tensor] | None = None
    keys_values: Callable[[], list[tuple[torch.Tensor, torch.Tensor]]] | None = None


def site_key(path: str, kind: str) -> str:
    """A ModuleDict-safe key for a site: module paths contain dots, which ModuleDict refuses."""
    return f"{kind}:{path.replace('.', '/')}"


class SiteModule(nn.Module):
    """What every adapter site module offers. ``path`` is the base model's module path of the site.

    The per-site capabilities of a method (:mod:`fxpeft.methods`) are methods here with defaults that do
    nothing or say "not supported", so the engine calls them on every site without asking what it is:
    :meth:`merge_into` / :meth:`unmerge_from`, :meth:`set_alpha`, :meth:`reload` (new hyper-parameters from a
    file, in place), :meth:`retarget` (a new base model) and :meth:`cached_tokens` (virtual tokens for a KV cache)."""

    path: str
    # True for a site that applies to a whole call, not per batch row (a trained copy read instead of the base
    # tensor): a mixed batch (``adapter_names``) cannot give it to some rows only, so such a batch is refused.
    serves_whole_call: bool = False
    # Why a mixed batch (``adapter_names``) may not name this site's adapter, or None where it may (PEFT refuses some
    # methods per row, and fxpeft refuses them too): the engine refuses such a batch with this reason.
    per_row_refusal: str | None = None
    # Why this site cannot be merged into the base weights (a non-linear adapter), or None where it can: ``merge``
    # refuses an adapter holding such a site before it writes anything.
    merge_refusal: str | None = None
    # True for a site whose tensors stand in for base tensors (a trained copy): a cast gives them the base's dtype.
    # Otherwise a cast (``.half()``, ``.to(dtype)``) gives them :func:`adapter_dtype` of the new base dtype.
    dtype_follows_base: bool = False

    def _apply(self, fn, recurse=True):
        """Moves and casts: the device as ``fn`` says; the dtype by fxpeft's adapter policy (see
        ``dtype_follows_base``): float32 over a half-precision base, as PEFT's ``autocast_adapter_dtype=True`` keeps
        adapters, and the base's dtype otherwise (``.double()`` gives float64 adapters)."""
        return super()._apply(fn if self.dtype_follows_base else _as_adapter_move(fn), recurse)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """This site's tensors under the keys PEFT saves them with (``base_model.model.<path>...``)."""
        raise NotImplementedError

    def peft_keys(self) -> dict[str, tuple[int, ...]]:
        """Expected keys and shapes, for validating a file before loading it."""
        return {key: tuple(value.shape) for key, value in self.peft_state_dict().items()}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors (already validated by key and shape) into this site's parameters."""
        own = self.peft_state_dict()
        for key, value in state.items():
            if key in own:
                own[key].copy_(value.to(dtype=own[key].dtype, device=own[key].device))

    def reset_parameters(self) -> None:
        """Give this site's parameters their initial values (used after creating them on ``meta``)."""
        raise NotImplementedError

    def merge_into(self, base_model: nn.Module) -> None:
        """Fold this site into the base model's weights (``AdaptedModel.merge``)."""
        raise UnsupportedError(f"{type(self).__name__} cannot be merged into the base weights.")

    def unmerge_from(self, base_model: nn.Module) -> None:
        """Undo :meth:`merge_into`."""
        raise UnsupportedError(f"{type(self).__name__} cannot be unmerged from the base weights.")

    def shadowed_base_parameters(self) -> int:
        """How many base parameters this site replaces rather than adds to (for PEFT's parameter count)."""
        return 0

    def set_alpha(self, alpha: float) -> None:
        """Take a new ``alpha`` in place (``AdaptedModel.set_alpha``); sites without one ignore it."""

    def cached_tokens(self) -> CachedTokens | None:
        """The virtual tokens this site puts in front of a call's sequence, as a KV cache holds them (generation);
        None for sites that add no tokens."""
        return None

    def reload(self, rules: list[Rule]) -> bool:
        """Take the hyper-parameters of ``rules`` (an adapter file's, loaded in place over this adapter) without
        touching the graph where possible; returns True when the graph must be rewritten again."""
        return False

    # -- hot swap (fxpeft/runtime/hotswap.py): a slot's site, sized once for every adapter that may take it ----------
    def hotswap_refusal(self, capacity: int) -> str | None:
        """Why this site cannot be padded to ``capacity`` for hot swap (its kind, or a rank over it), or None."""
        return f"{type(self).__name__} at {self.path} cannot be hot-swapped."

    def pad_to(self, capacity: int) -> None:
        """Replace this site's tensors by ones sized for ``capacity``, holding the same values (zeros added)."""
        raise UnsupportedError(self.hotswap_refusal(capacity) or "")

    def spare(self, capacity: int) -> "SiteModule":
        """A site like this one (path, shapes, device, dtype), padded to ``capacity``, holding nothing: what a slot
        has at a site its adapter does not target."""
        raise UnsupportedError(self.hotswap_refusal(capacity) or "")

    def hold_graph_settings(self, settings: dict) -> None:
        """Take the hot-swap slots' graph settings (``Method.graph_settings``, LoRA's dropout), which the rewrite reads
        from the site; a ``take`` later keeps them."""

    def take(self, rule: Rule | None) -> None:
        """Become ``rule``'s site here, with fresh initial values, in place (same tensors), or hold nothing (None)."""
        raise UnsupportedError(self.hotswap_refusal(0) or "")

    def hotswap_keys(self, rule: Rule) -> dict[str, tuple[int, ...]]:
        """The keys and shapes ``rule``'s adapter saves for this site (what a file must hold to load into it)."""
        raise UnsupportedError(self.hotswap_refusal(0) or "")

    @torch.no_grad()
    def retarget(self, base_model: nn.Module) -> None:
        """The adapted model's base model was replaced by ``base_model`` (same structure): tensors created on
        ``meta`` move to its device and get their initial values."""
        if any(tensor.device.type == "meta" for tensor in self.parameters()):
            self.to_empty(device=device_of(base_model))
            self.reset_parameters()


class ParameterCopy(SiteModule):
    """A trainable copy of one base parameter (PEFT's ``modules_to_save`` and trained biases).

    The graph reads the copy instead of the base tensor, so the base model is never written.
    ``peft_name`` is the key PEFT saves it under, without the ``base_model.model.`` prefix.

    ``uses``: the paths of the base tensor whose reads the copy stands in for; None (the default) for every read.
    A tensor that several paths share (tied weights, fxpeft/shared_tensors.py) gets one copy for all the paths
    selected (:meth:`serve`), saved under each one's key, as PEFT's ``ensure_weight_tying`` saves it; its other
    paths keep reading the base tensor.
    """

    serves_whole_call = True
    dtype_follows_base = True

    def __init__(self, fqn: str, source: torch.Tensor, peft_name: str, shadows: bool,
                 uses: tuple[str, ...] | None = None):
        super().__init__()
        self.path = fqn
        self.peft_name = peft_name
        self.peft_names: tuple[str, ...] = (peft_name,)
        self.uses = uses
        self.shadows = shadows
        self.weight = nn.Parameter(source.detach().clone(), requires_grad=True)
        self._source = [source]  # not a submodule: only to re-initialise from

    def serve(self, fqn: str, peft_name: str) -> None:
        """Stand in for the reads of the base tensor as ``fqn`` too (another path of a tied tensor), saved under
        ``peft_name`` as well."""
        if self.uses is not None and fqn not in self.uses:
            self.uses = (*self.uses, fqn)
        if peft_name not in self.peft_names:
            self.peft_names = (*self.peft_names, peft_name)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The copy under its first key; under each other key (other paths of a tied tensor) a detached clone of
        it, as PEFT's ``save_pretrained`` writes them (safetensors refuses tensors that share memory)."""
        first, *others = self.peft_names
        return {f"base_model.model.{first}": self.weight,
                **{f"base_model.model.{name}": self.weight.detach().clone() for name in others}}

    def peft_keys(self) -> dict[str, tuple[int, ...]]:
        return {f"base_model.model.{name}": tuple(self.weight.shape) for name in self.peft_names}

    @torch.no_grad()
    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """One tensor under each of :attr:`peft_names`: the file must hold one value for all of them."""
        given = [(key, state[key]) for key in self.peft_keys() if key in state]
        differing = [key for key, value in given[1:] if not torch.equal(value, given[0][1])]
        if differing:
            uses = self.uses or (self.path,)
            owner, _, attribute = uses[-1].rpartition(".")
            raise AdapterLoadError(
                f"The adapter file holds different values for {given[0][0]} and {differing}, but in this base model "
                f"they are one tensor ({', '.join(uses)} are tied), trained here as one copy. The file was trained "
                "with a separate copy per path (PEFT without ensure_weight_tying): to load it as that, untie the base "
                f"model's weights before loading (`model.get_submodule({owner!r}).{attribute} = torch.nn.Parameter("
                f"model.get_parameter({uses[-1]!r}).detach().clone())`), or keep one of these modules in "
                "modules_to_save.", mismatches=differing)
        if given:
            self.weight.copy_(given[0][1].to(dtype=self.weight.dtype, device=self.weight.device))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.copy_(self._source[0].to(self.weight.device))

    def retarget(self, base_model: nn.Module) -> None:
        """Point the copy at the new base model's tensor and copy its values."""
        source = base_model.get_parameter(self.path)
        self._source = [source]
        with torch.no_grad():
            if self.weight.device != source.device:
                self.weight.data = torch.empty_like(source)
            self.weight.copy_(source)

    def shadowed_base_parameters(self) -> int:
        return self.weight.numel() if self.shadows else 0

    def merged_parameters(self) -> dict[str, tuple[str, ...] | None]:
        """What :meth:`merge_into` writes (fxpeft/shared_tensors.py): the base parameter, right for ``uses``."""
        return {self.path: self.uses}

    @torch.no_grad()
    def merge_into(self, base_model: nn.Module) -> None:
        """The base tensor takes the trained values; the original is kept to restore on unmerge."""
        base = base_model.get_parameter(self.path)
        self._original = base.detach().clone()
        base.copy_(self.weight)

    @torch.no_grad()
    def unmerge_from(self, base_model: nn.Module) -> None:
        base_model.get_parameter(self.path).copy_(self._original)
        del self._original


class Adapter(nn.Module):
    """One named adapter: the rules it was made from and its site modules."""

    def __init__(self, rules: list[Rule]):
        super().__init__()
        self.rules = list(rules)
        self.sites = nn.ModuleDict()
        self.frozen = False  # True for an adapter loaded for inference only (is_trainable=False)
        self.selected: dict[Rule, list[str]] = {}  # module paths each rule selected, for the saved config

    def get_or_create(self, key: str, factory) -> SiteModule:
        if key not in self.sites:
            self.sites[key] = factory()
        return self.sites[key]

    def site_modules(self) -> Iterator[SiteModule]:
        return iter(self.sites.values())

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Every site's tensors (the live parameters) under PEFT's saved key names."""
        state: dict[str, torch.Tensor] = {}
        for site in self.site_modules():
            state.update(site.peft_state_dict())
        return state

    def peft_keys(self) -> dict[str, tuple[int, ...]]:
        """The keys and shapes a state dict must have to load into this adapter."""
        expected: dict[str, tuple[int, ...]] = {}
        for site in self.site_modules():
            expected.update(site.peft_keys())
        return expected

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], where: str = "the state dict") -> None:
        """Copy a state dict keyed as PEFT saves it (``get_peft_model_state_dict``) into this adapter.

        Every key and shape is checked first; on a mismatch :class:`fxpeft.errors.AdapterLoadError` lists
        them all and nothing is written. Example::

            adapted.adapters["default"].load_peft_state_dict(peft.get_peft_model_state_dict(peft_model))
        """
        check_state_fits(self.peft_keys(), state, where)
        for site in self.site_modules():
            site.load_peft_state_dict(state)

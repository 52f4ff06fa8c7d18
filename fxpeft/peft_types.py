"""PEFT's adapter types that fxpeft does not read, each with the nearest method fxpeft has, for the error that refuses
such a folder or config (:func:`fxpeft.methods.codec_for_peft_type`).

"Nearest" is by what the method does to the model, not by name: an additive low-rank (or sparse, or spectral) update
of a weight is nearest to LoRA, one built from frozen random shared projections to VeRA, an orthogonal or
multiplicative update of a weight to DoRA (a rescaled LoRA update; the closest fxpeft has to changing a weight's
direction and norm), learned tokens or key/value prefixes to prompt or prefix tuning, and training a few whole modules
to :class:`~fxpeft.Trainable`. A type PEFT adds later that this table does not know is answered with the list of what
fxpeft reads.
"""

from __future__ import annotations

__all__ = ["NEAREST", "unsupported_type_message"]

_LOW_RANK = ("LoRA", "an additive low-rank weight update, as LoRA's")
_RANDOM_BASIS = ("VeRA", "an update through frozen random projections shared by the layers, as VeRA's")
_ORTHOGONAL = ("LoRA(use_dora=True) (DoRA)", "a multiplicative (orthogonal or rescaling) weight update; DoRA "
                                             "rescales and redirects the weight")
_TOKENS = ("PromptTuning", "learned virtual tokens at the input")
_PREFIX = ("PrefixTuning", "learned keys and values at the attention ops")

# PEFT 0.21's ``PeftType`` names -> (the nearest fxpeft method, what the two share).
NEAREST: dict[str, tuple[str, str]] = {
    "ADALORA": ("LoRA", "a low-rank update (AdaLoRA adapts each layer's rank; LoRA's rank_pattern fixes ranks)"),
    "XLORA": ("LoRA", "mixtures of LoRA adapters (fxpeft mixes adapters per batch row with adapter_names)"),
    "POLY": ("LoRA", "a routed set of LoRA adapters (fxpeft mixes adapters per batch row with adapter_names)"),
    "ADAMSS": _LOW_RANK, "LILY": _LOW_RANK, "GLORA": _LOW_RANK, "FROD": _LOW_RANK, "DELORA": _LOW_RANK,
    "GRALORA": _LOW_RANK, "TINYLORA": _LOW_RANK, "HIRA": _LOW_RANK, "ROAD": _LOW_RANK, "MISS": _LOW_RANK,
    "BONE": _LOW_RANK, "SHIRA": ("LoRA", "a sparse additive weight update (LoRA's is low-rank)"),
    "FOURIERFT": ("LoRA", "an additive weight update (FourierFT's is spectral, LoRA's low-rank)"),
    "WAVEFT": ("LoRA", "an additive weight update (WaveFT's is in a wavelet basis, LoRA's low-rank)"),
    "C3A": ("LoRA", "an additive weight update (C3A's is a circular convolution, LoRA's low-rank)"),
    "OSF": _LOW_RANK, "PSOFT": _ORTHOGONAL, "PEANUT": _LOW_RANK, "SHADOW": _LOW_RANK, "SUPERTUNING": _LOW_RANK,
    "DEFT": _LOW_RANK, "BEFT": _LOW_RANK,
    "RANDLORA": _RANDOM_BASIS, "VBLORA": ("VeRA", "updates built from a shared bank of vectors, as VeRA's from shared "
                                                  "projections"),
    "UNILORA": _RANDOM_BASIS, "PVERA": _RANDOM_BASIS,
    "OFT": _ORTHOGONAL, "BOFT": _ORTHOGONAL, "HRA": _ORTHOGONAL,
    "MULTITASK_PROMPT_TUNING": ("PromptTuning", "learned virtual tokens (one set per task here: one adapter each)"),
    "CPT": _TOKENS,
    "ADAPTION_PROMPT": ("PrefixTuning", "learned prompts at the attention ops (without the zero-init gate)"),
    "CARTRIDGE": _PREFIX,
    "LN_TUNING": ("Trainable", "training whole modules: Trainable(targets=[...]) on the layer norms"),
    "TRAINABLE_TOKENS": ("Trainable", "training the embedding (Trainable on the embedding trains it whole, not "
                                      "chosen rows)"),
}


def unsupported_type_message(peft_type: str, known: list[str]) -> str:
    """Why a PEFT folder or config of ``peft_type`` is refused: the type, the nearest fxpeft method and what they
    share, and the types fxpeft reads (``known``)."""
    nearest = NEAREST.get(str(peft_type).upper())
    message = f"adapter_config.json has peft_type {peft_type!r}, which fxpeft does not support"
    if nearest is not None:
        method, shared = nearest
        message += (f". The nearest method fxpeft has is {method} ({shared}): train a new adapter with "
                    f"fxpeft.{method.split(' ')[0].split('(')[0]}(...) and use PEFT for this one")
    return f"{message}. fxpeft reads peft_type {sorted(known)}."

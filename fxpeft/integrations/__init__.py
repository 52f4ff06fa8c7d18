"""Integrations with training libraries: :mod:`fxpeft.integrations.trainer` (transformers' ``Trainer``) and
:mod:`fxpeft.integrations.sft` (TRL's ``SFTTrainer``; needs ``trl``). Import them by module; this package imports
neither, so that ``trl`` stays optional."""

__all__: list[str] = []

"""Rewrite passes, one module per method. Importing this package imports every module in it, and each
registers its pass with the engine (``fxpeft.rewrite.register_pass``): adding a method is adding a file."""

import importlib
import pkgutil

__all__ = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]

for _name in __all__:
    importlib.import_module(f"{__name__}.{_name}")

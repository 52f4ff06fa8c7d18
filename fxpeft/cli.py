"""The command line: ``fxpeft check BASE ADAPTER [--json] [--rules FILE]`` (also ``python -m fxpeft check``).

``BASE`` is a local transformers model folder (loaded with the class its ``config.json`` names in
``architectures``) or ``package.module:factory``, a callable returning the base model. ``ADAPTER`` is an
adapter folder in PEFT's layout, or ``package.module:factory`` returning an :class:`fxpeft.AdaptedModel`
(a trained model in memory, to check its graph and base weights too). ``--rules FILE`` is a JSON list of
rule dicts (:meth:`fxpeft.Rule.from_dict`) saying what the adapter may contain.

Exit status: 0 when everything holds, 1 when a check fails, 2 when the inputs cannot be loaded, the command is
misused, or the checks did not complete for any other reason (the reason is on stderr), so that a CI gate cannot
pass by accident: a factory (or a model it returns) that calls ``sys.exit(0)``, raises ``SystemExit`` or any
other exception while loading or running is exit status 2, and a ``KeyboardInterrupt`` is 130, as shells report
an interrupted command. 0 is returned only after the report was printed. (A process ended from inside, with
``os._exit(0)``, cannot be caught by any code; a CI gate that runs code it does not trust should also require the
report's last line, ``result: OK``.) Example, in CI::

    fxpeft check models/base out/adapter --rules adapter-rules.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from fxpeft.errors import FxpeftError
from fxpeft.formats.files import read_adapter
from fxpeft.formats.peft import read_config
from fxpeft.model import AdaptedModel
from fxpeft.rules import Rule
from fxpeft.verification import verify

__all__ = ["main"]

OK, FAILED, UNUSABLE, INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """The command's inputs cannot be used; the message says which and why."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpeft", description="fxpeft: parameter-efficient fine-tuning as a "
                                     "graph rewrite.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check", help="check that an adapter is its base model plus its declared adapters",
        description="Check that ADAPTER on BASE is the base model plus the adapters its config declares: the "
                    "graph node for node, the base weights byte for byte, the outputs with adapters disabled bit "
                    "for bit and merged within rounding (virtual tokens: the base model called with the file's "
                    "virtual tokens as PEFT calls it), and the adapter file itself. Exit status 0: all holds; "
                    "1: something does not; 2: the inputs could not be loaded.")
    check.add_argument("base", metavar="BASE",
                       help="transformers model folder (save_pretrained) or package.module:factory returning the model")
    check.add_argument("adapter", metavar="ADAPTER",
                       help="adapter folder (adapter_config.json + adapter_model.safetensors) or "
                            "package.module:factory returning an fxpeft.AdaptedModel")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    check.add_argument("--rules", metavar="FILE", type=Path,
                       help="JSON list of rule dicts (fxpeft.Rule.from_dict) the adapter must stay within")
    return parser


def _factory(spec: str, what: str) -> Any:
    """Call ``package.module:factory`` (the current folder is importable, as for ``python -m``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{what} {spec!r} is neither a folder nor of the form package.module:factory.")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"{what} {spec!r}: cannot import {module_name!r} ({error}).") from error
    except (Exception, SystemExit) as error:  # its import-time code failed or exited: the check cannot run
        raise UsageError(f"{what} {spec!r}: importing {module_name!r} {_exited(error)}") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise UsageError(f"{what} {spec!r}: {module_name!r} has no attribute {attribute!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise UsageError(f"{what} {spec!r} is not callable; give a function that returns the model.")
    try:
        return target()
    except (Exception, SystemExit) as error:
        raise UsageError(f"{what} {spec!r} {_exited(error)} instead of returning a model") from error


def _exited(error: BaseException) -> str:
    """How code the command ran ended early, for a message: ``called sys.exit(0)`` or ``raised ValueError: ...``."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r})"
    return f"raised {type(error).__name__}: {error}"


def _load_base(spec: str):
    folder = Path(spec)
    if folder.is_dir():
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise UsageError(f"BASE {folder} has no config.json: is it a transformers model folder (save_pretrained)?")
        try:  # the base model is the user's own (no size bound: some configs list 20,000 labels)
            architectures = json.loads(config_file.read_text()).get("architectures") or []
        except (ValueError, UnicodeDecodeError, AttributeError, RecursionError) as error:
            raise UsageError(f"BASE {config_file} is not a valid config: {error}") from error
        if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
            raise UsageError(f"BASE {config_file}: `architectures` must be a list of class names, got "
                             f"{str(architectures)[:80]}.")
        if not architectures:
            raise UsageError(f"BASE {config_file} names no `architectures`, so the model class is unknown; give "
                             "package.module:factory instead.")
        # Imported here, not at the top: transformers reads main()'s logging defaults from the environment on import.
        import transformers

        model_class = getattr(transformers, architectures[0], None)
        if model_class is None:
            raise UsageError(f"BASE {config_file} names the class {architectures[0]!r}, which this transformers "
                             f"({transformers.__version__}) does not have; give package.module:factory instead.")
        try:
            model = model_class.from_pretrained(folder)
        except (OSError, ValueError, RuntimeError) as error:
            raise UsageError(f"BASE {folder} could not be loaded as {architectures[0]}: {error}") from error
    elif Path(spec).exists():
        raise UsageError(f"BASE {spec} is a file; give a model folder or package.module:factory.")
    else:
        model = _factory(spec, "BASE")
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"BASE {spec} gave a {type(model).__name__}, not a torch.nn.Module.")
    return model.eval()


def _load_adapter(spec: str):
    folder = Path(spec)
    if folder.is_dir():
        read_adapter(folder)  # a truncated or missing file fails here, before the base model is loaded
        return folder
    if folder.exists():
        raise UsageError(f"ADAPTER {spec} is a file; give the adapter folder (adapter_config.json + "
                         "adapter_model.safetensors) or package.module:factory.")
    if ":" not in spec:
        raise UsageError(f"ADAPTER {spec} does not exist (no such folder), and is not package.module:factory.")
    return lambda: _checked_adapted(_factory(spec, "ADAPTER"), spec, AdaptedModel)


def _checked_adapted(value, spec, adapted_class):
    if not isinstance(value, adapted_class):
        raise UsageError(f"ADAPTER {spec} gave a {type(value).__name__}, not an fxpeft.AdaptedModel.")
    return value


def _load_rules(path: Path) -> list[dict]:
    try:
        rules = read_config(path)  # bounded in size and nesting: a rules file may come from elsewhere too
    except FxpeftError as error:
        raise UsageError(f"--rules: {error}") from error
    if not isinstance(rules, list) or not all(isinstance(rule, dict) for rule in rules) or not rules:
        raise UsageError(f"--rules {path} must hold a non-empty JSON list of rule objects, e.g. "
                         '[{"method": "lora", "targets": ["q_proj", "v_proj"], "r": 8}].')
    for rule in rules:
        Rule.from_dict(rule)  # a bad rule fails now, with its own message
    return rules


def _check(args: argparse.Namespace) -> int:
    try:
        rules = _load_rules(args.rules) if args.rules is not None else None
        adapter = _load_adapter(args.adapter)
        base = _load_base(args.base)
        adapted = adapter if isinstance(adapter, Path) else adapter()
        report = verify(base, adapted, rules=rules)
    except (UsageError, FxpeftError) as error:
        print(f"fxpeft check: error: {error}", file=sys.stderr)
        return UNUSABLE
    except KeyboardInterrupt:
        print("fxpeft check: interrupted; the checks did not complete.", file=sys.stderr)
        return INTERRUPTED
    except BaseException as error:  # a failure of the check itself is not a finding about the adapter; nor is an
        # exit from code it ran (a model's forward calling sys.exit): either way the checks did not complete
        traceback.print_exc()
        print(f"fxpeft check: error: the check could not complete ({_exited(error)}).", file=sys.stderr)
        return UNUSABLE
    print(report.to_json() if args.json else report.summary())
    return OK if report.ok else FAILED


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 all holds, 1 a check failed, 2 unusable inputs)."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # keep loading chatter out of CI logs
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.command == "check":
        return _check(args)
    return UNUSABLE  # argparse refuses unknown commands before this


if __name__ == "__main__":
    sys.exit(main())

"""gin for the command-line entry points: where gin files are found, how a command line becomes
a parsed config, which macros a run needs, and errors that name the fix.

Every CLI that takes `--gin_file=` / `--gin.NAME=VALUE` (train, compile) and the sweep validator
go through `parse`, so a typo is caught the same way everywhere, before anything runs.
"""
from __future__ import annotations

import difflib
import inspect
import re
import tokenize
import typing
from pathlib import Path
from typing import Sequence

from llamax.errors import ConfigError, describe_type, type_matches

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIRED_MACROS = ("MODEL_DIR", "TRAIN_STEPS", "CHECKPOINT_EVERY", "LOG_EVERY")
# What gin raises for a bad file or binding: SyntaxError/TokenError for malformed values,
# RecursionError for self-referencing macros.
GIN_ERRORS = (ValueError, KeyError, SyntaxError, tokenize.TokenError, RecursionError)


class GinError(ConfigError):
    """A gin file or binding is missing, malformed or names something that does not exist."""


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """(gin files, bindings, other --options) of a command line."""
    gin_files, bindings, options = [], [], {}
    for arg in argv:
        if arg.startswith("--gin_file="):
            gin_files.append(arg.split("=", 1)[1])
        elif arg.startswith("--gin."):
            bindings.append(arg[len("--gin."):])
        elif arg.startswith("--") and "=" in arg:
            key, value = arg[2:].split("=", 1)
            options[key] = value
        elif arg.startswith("--"):
            options[arg[2:]] = "true"
        else:
            raise GinError(f"unexpected argument {arg!r}; pass --gin_file=FILE, --gin.NAME=VALUE or --option=VALUE")
    return gin_files, bindings, options


def resolve_gin_file(gin_file: str) -> str:
    """The path of `gin_file`: as given, or relative to the repository or its configs/."""
    for candidate in (Path(gin_file), REPO_ROOT / gin_file, REPO_ROOT / "configs" / gin_file):
        if candidate.exists():
            return str(candidate)
    raise GinError(f"gin file {gin_file!r} not found (looked in ., {REPO_ROOT}, {REPO_ROOT / 'configs'})")


def _gin():
    import gin

    # Includes inside gin files resolve from the repository from any working directory.
    for path in (REPO_ROOT, REPO_ROOT / "configs"):
        if str(path) not in gin.config._LOCATION_PREFIXES:  # noqa: SLF001 - avoid duplicates
            gin.add_config_file_search_path(str(path))
    return gin


def macros() -> tuple[set[str], set[str]]:
    """(defined, referenced) macro names of the config gin holds now."""
    gin = _gin()
    config = gin.config._CONFIG  # noqa: SLF001 - gin has no public listing
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    referenced, stack = set(), [value for params in config.values() for value in params.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, gin.config.ConfigurableReference):
            scope, _, selector = value.scoped_selector.rpartition("/")
            if selector == "gin.macro":
                referenced.add(scope)
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return defined, referenced


def check_macro_bindings(bindings: Sequence[str], gin_files: Sequence[str]) -> None:
    """GinError for a `NAME=VALUE` binding of a macro the gin files neither define nor use: gin
    would accept it and change nothing (a typo such as TRAIN_STEP for TRAIN_STEPS)."""
    defined, referenced = macros()
    # A binding may also introduce a macro that another binding uses (`X=%NEW`).
    used_by_bindings = {name for binding in bindings for name in re.findall(r"%(\w+)", binding)}
    known = sorted(defined | referenced | used_by_bindings)
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if name and "." not in name and "/" not in name and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; known macros: {known}"
            raise GinError(f"--gin.{name}: macro {name} is neither defined nor used by "
                           f"{list(gin_files)}, so binding it would change nothing{hint}")


def parse(gin_files: Sequence[str], bindings: Sequence[str], *,
          required: Sequence[str] = REQUIRED_MACROS) -> None:
    """Parses gin files and bindings into a fresh config, then checks them: unknown macros, values
    of the wrong type, missing required macros. Raises GinError with one line that names the
    binding, the problem and the nearest valid name."""
    gin = _gin()
    resolved = [resolve_gin_file(f) for f in gin_files]
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(resolved, [], finalize_config=False)
        check_macro_bindings(bindings, gin_files)
        for binding in bindings:  # one at a time, so an error names its binding
            try:
                gin.parse_config_files_and_bindings([], [binding], finalize_config=False)
            except GIN_ERRORS as error:
                hint = _quoting_hint(binding)
                problem = "not a gin value (values are Python literals)" if hint else explain_gin_error(error)
                raise GinError(f"--gin.{binding}: {problem}{hint}") from error
        check_binding_types(bindings)
        defined, _ = macros()
        for binding in bindings:  # `X=%NAME` with NAME never defined fails only when X is used
            for name in re.findall(r"%(\w+)", binding.partition("=")[2]):
                if name not in defined:
                    close = difflib.get_close_matches(name, sorted(defined), n=1)
                    hint = f"; did you mean %{close[0]}?" if close else ""
                    raise GinError(f"--gin.{binding}: macro {name} is not defined by the gin files "
                                   f"or another binding{hint}")
        for macro in required:
            if macro not in defined:
                raise GinError(f"missing required gin macro {macro}: define it in your run file or "
                               f"pass --gin.{macro}=VALUE")
    except GinError:
        raise
    except GIN_ERRORS as error:
        raise GinError(explain_gin_error(error)) from error


def _quoting_hint(binding: str) -> str:
    """For an unquoted string value, the quoting that makes it one (gin values are Python literals)."""
    name, _, value = binding.partition("=")
    value = value.strip()
    if not value or value[0] in "'\"@%([{" or value in ("True", "False", "None"):
        return ""
    try:
        float(value)
        return ""
    except ValueError:
        return f"; a string needs quotes inside the shell's: --gin.{name.strip()}=\"'{value}'\""


class _Unknown:
    """A gin value whose Python value is not known before running (a configurable's result)."""


def _value(value: object, depth: int = 0) -> tuple[object, list[str]]:
    """(the Python value a gin binding value stands for, the macros it went through)."""
    gin = _gin()
    if isinstance(value, gin.config.ConfigurableReference) and depth < 20:
        scope, _, selector = value.scoped_selector.rpartition("/")
        if selector == "gin.macro":
            resolved, via = _value(gin.config._CONFIG.get((scope, "gin.macro"), {}).get("value", _Unknown),  # noqa: SLF001
                                   depth + 1)
            return resolved, [scope, *via]
        return _Unknown, []
    return value, []


def _parameter_types(selector: str) -> dict[str, object]:
    gin = _gin()
    try:
        wrapped = gin.config._REGISTRY.get_match(selector).wrapped  # noqa: SLF001
        return typing.get_type_hints(wrapped)
    except Exception:  # noqa: BLE001 - a configurable without usable annotations is not checked
        return {}


def check_binding_types(bindings: Sequence[str] = ()) -> None:
    """GinError for a bound value that does not fit the annotated type of the parameter it sets,
    naming the command-line binding it came from: `--gin.LEARNING_RATE="'abc'"` sets
    optim.OptimConfig.learning_rate, which must be a float."""
    gin = _gin()
    given = {b.split("=", 1)[0].strip(): b for b in bindings}
    for (scope, selector), params in list(gin.config._CONFIG.items()):  # noqa: SLF001
        if selector == "gin.macro":
            continue
        hints = _parameter_types(selector)
        for param, bound in params.items():
            value, via = _value(bound)
            annotation = hints.get(param)
            if value is _Unknown or annotation is None or type_matches(value, annotation):
                continue
            target = f"{selector.split('.')[-2] + '.' if '.' in selector else ''}{selector.split('.')[-1]}.{param}"
            source = next((given[m] for m in via if m in given), given.get(target))
            where = f"--gin.{source}: " if source else (f"macro {via[0]}: " if via else "")
            raise GinError(f"{where}{target} must be {describe_type(annotation)}, got {value!r} "
                           f"({type(value).__name__}){_quoting_hint(source) if source else ''}")


def name_the_binding(message: str, bindings: Sequence[str]) -> str:
    """`message` (a ConfigError naming a config field, e.g. 'OptimConfig.learning_rate must be
    >= 0') prefixed with the command-line binding that set that field, when one did."""
    gin = _gin()
    field = re.search(r"\b([A-Z]\w*Config)\.(\w+)", message)
    if not field:
        return message
    given = {b.split("=", 1)[0].strip(): b for b in bindings}
    for (_, selector), params in list(gin.config._CONFIG.items()):  # noqa: SLF001
        if selector.split(".")[-1] != field.group(1) or field.group(2) not in params:
            continue
        _, via = _value(params[field.group(2)])
        names = [*via, f"{selector.split('.')[-2]}.{field.group(1)}.{field.group(2)}"]
        source = next((given[name] for name in names if name in given), None)
        if source:
            return f"--gin.{source}: {message}"
    return message


def gin_call_error(error: BaseException, bindings: Sequence[str]) -> str | None:
    """One line for an error that calling gin's configured functions raised because of the
    configuration (a self-referencing binding, a configurable called without its arguments);
    None for any other error, which is a bug to show in full."""
    calls = [f"--gin.{b}" for b in bindings if re.search(r"@[\w.]+\(\)", b)]
    if isinstance(error, RecursionError):
        return ("the gin configuration calls a configurable inside its own arguments, which never "
                f"ends (a value such as '@config.ModelConfig()' bound where ModelConfig reads it){': ' if calls else ''}"
                f"{', '.join(calls)}")
    message = str(error)
    # Only a configurable called without its arguments; any other TypeError (gin names the
    # configurable it passed through for every exception) is a bug, shown in full.
    if isinstance(error, TypeError) and "No values supplied by Gin or caller" in message:
        where = re.search(r"In call to configurable '([\w.]+)'", message)
        return (f"{message.splitlines()[0]} (calling gin configurable {where.group(1)})"
                f"{'; check ' + ', '.join(calls) if calls else ''}")
    return None


def explain_gin_error(error: BaseException) -> str:
    """gin's message, plus the nearest valid name for typos in configurables and parameters."""
    gin = _gin()
    message = str(error).strip()
    missing_macro = re.search(r"No bindings specified for '(\w+)/gin\.macro'", message)
    if missing_macro:
        return (f"missing required gin macro {missing_macro.group(1)}: define it in your run file or "
                f"pass --gin.{missing_macro.group(1)}=VALUE")
    unknown_param = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message)
    if unknown_param:
        configurable, name = unknown_param.groups()
        try:
            known = list(inspect.signature(gin.config._REGISTRY.get_match(configurable).wrapped).parameters)  # noqa: SLF001
        except Exception:  # noqa: BLE001 - best effort suggestion only
            known = []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else (f"; valid: {known}" if known else "")
        return f"unknown gin binding {configurable}.{name}{hint}"
    unknown_configurable = re.search(r"No configurable matching '([\w.]+)'", message)
    if unknown_configurable:
        name = unknown_configurable.group(1)
        # The registry holds complete selectors ('llamax.train.fit.TrainConfig'); compare as many
        # trailing components as the user wrote ('fit.TrainConfg' -> 'fit.TrainConfig').
        depth = name.count(".") + 1
        known = sorted({".".join(selector.split(".")[-depth:])
                        for selector, _ in gin.config._REGISTRY.items()})  # noqa: SLF001
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown gin configurable {name}{hint}"
    return message.splitlines()[0] if message else type(error).__name__

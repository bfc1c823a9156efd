"""The `effconv` command: a thin typer layer over the Python API (effconv.pipelines, effconv.eval).

Each command's options are generated from the fields of its settings dataclass (effconv/config.py declares them
once, with their help), so the CLI, the YAML recipes and the Python API cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .errors import EffconvError, failure_line

app = typer.Typer(
    name="effconv",
    help="Convert pretrained softmax Transformers into efficient architectures and distill the quality back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

RECIPE_HELP = "YAML recipe; options given here override it"
DEBUG_ENV = "EFFCONV_DEBUG"
DEBUG_HELP = f"Show a failure's full traceback instead of one line (also {DEBUG_ENV}=1)"
_debug_option = False  # --debug, given before or after the command name


class Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer (which would end it with exit code 130 and no message); its
    message says what can be resumed."""


def debug_requested() -> bool:
    return _debug_option or os.environ.get(DEBUG_ENV, "") == "1"


def _request_debug(on: bool) -> None:
    global _debug_option
    _debug_option = _debug_option or on


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)] = False) -> None:
    """effconv: linearize softmax Transformers and distill them."""
    _request_debug(debug)


def _list_item_type(hint: Any) -> type | None:
    """int or str for a `list[int] | None` / `list[str] | None` field, None for other fields."""
    for t in typing.get_args(hint) or (hint,):
        if typing.get_origin(t) is list:
            return typing.get_args(t)[0]
    return None


def _scalar_type(hint: Any) -> type:
    args = [t for t in typing.get_args(hint) if t is not type(None)]
    return args[0] if args else hint


def parse_list(text: str, option: str, kind: type) -> list:
    """A comma-separated option value as a list of `kind`."""
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise EffconvError(f"{option} takes comma-separated {kind.__name__}s, got {text!r}") from e


def _cli_parameter(field: dataclasses.Field, hint: Any, argument: bool) -> tuple[inspect.Parameter, Callable]:
    """The typer parameter of a settings field and the function turning its CLI value into a setting (None: keep
    the recipe's or the default value)."""
    help_text, flag = field.metadata.get("help", ""), field.metadata.get("flag")
    name = field.name
    if argument:
        info = typer.Argument(help=help_text)
        annotation, convert = Annotated[Optional[str], info], lambda v: v
    elif _scalar_type(hint) is bool:
        # a pair of switches ("--decay/--no-decay", "--progress/--no-progress"): either one overrides a recipe's
        # value; the help names the one that changes the default
        dash = name.replace("_", "-")
        switch = flag or (f"--no-{dash}" if field.default else f"--{dash}")
        said = help_text if switch == f"--{dash}" else f"{switch}: {help_text}"
        annotation = Annotated[Optional[bool], typer.Option(f"--{dash}/--no-{dash}", help=said, show_default=False)]
        if switch not in (f"--{dash}", f"--no-{dash}"):  # a switch named unlike its setting: that switch alone
            value = not field.default
            annotation = Annotated[bool, typer.Option(switch, help=help_text)]
            convert = lambda v, value=value: value if v else None  # noqa: E731
            return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=annotation), convert
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation), lambda v: v
    else:
        decls = (flag,) if flag else ()
        item = _list_item_type(hint)
        if item is not None:
            option = flag or f"--{name.replace('_', '-')}"
            annotation = Annotated[Optional[str], typer.Option(*decls, help=help_text)]
            convert = lambda v, option=option, item=item: None if v is None else parse_list(v, option, item)  # noqa: E731
        else:
            annotation = Annotated[Optional[_scalar_type(hint)], typer.Option(*decls, help=help_text)]
            convert = lambda v: v  # noqa: E731
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if argument else inspect.Parameter.KEYWORD_ONLY
    return inspect.Parameter(name, kind, default=None, annotation=annotation), convert


def add_command(target: typer.Typer, name: str, config_cls: type, run: Callable[[Any], Any], doc: str, *,
                first: tuple[str, ...] = (), argument: str | None = None,
                on_interrupt: Callable[[Any], str] | None = None) -> None:
    """Register `effconv NAME`: one option per CLI field of `config_cls` (the `first` ones first, then the rest in
    declaration order), plus --recipe after --out and --debug; the command builds the config (defaults <- recipe <-
    options) and calls `run` with it. Ctrl-C becomes `Interrupted` with `on_interrupt(config)` (what can be
    resumed) as its message."""
    from .config import build_config

    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True)]
    fields.sort(key=lambda f: (f.name != argument, f.name not in first, first.index(f.name) if f.name in first else 0))
    params, converters = [], {}
    for f in fields:
        param, converters[f.name] = _cli_parameter(f, hints[f.name], f.name == argument)
        params.append(param)
        if f.name == "out":
            params.append(inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[Path], typer.Option(help=RECIPE_HELP)]))
    if "recipe" not in [p.name for p in params]:
        params.append(inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[Optional[Path], typer.Option(help=RECIPE_HELP)]))

    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=Annotated[bool, typer.Option("--debug", help=DEBUG_HELP)]))

    def command(**values: Any) -> None:
        _request_debug(values.pop("debug"))
        recipe = values.pop("recipe")
        overrides = {k: converters[k](v) for k, v in values.items()}
        cfg = build_config(config_cls, recipe, overrides)
        try:
            run(cfg)
        except KeyboardInterrupt as e:
            raise Interrupted(on_interrupt(cfg) if on_interrupt else "interrupted") from e

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    target.command(name=name)(command)


def _run_linearize(cfg) -> None:
    from .pipelines.linearize import linearize

    linearize(cfg)


def _run_hybridize(cfg) -> None:
    from .pipelines.hybridize import hybridize

    hybridize(cfg)


def _run_moe_upcycle(cfg) -> None:
    from .pipelines.moe_upcycle import moe_upcycle

    moe_upcycle(cfg)


def _run_eval(cfg) -> None:
    from .eval.run import evaluate

    evaluate(cfg)


def _interrupted_run(cfg) -> str:
    from .training.run import interrupted_message, run_dir_for

    return interrupted_message([run_dir_for(Path(cfg.out))])


def _interrupted_hybridize(cfg) -> str:
    from .pipelines.hybridize import state_dir_for
    from .training.run import interrupted_message, run_dir_for

    return interrupted_message([run_dir_for(Path(cfg.out)), state_dir_for(Path(cfg.out))])


def register_commands(target: typer.Typer) -> None:
    """Add every effconv command to `target` (effconv's app, or a fresh one in tests)."""
    from .eval.run import EvalConfig
    from .pipelines.hybridize import HybridizeConfig
    from .pipelines.linearize import LinearizeConfig
    from .pipelines.moe_upcycle import MoeUpcycleConfig

    add_command(target, "linearize", LinearizeConfig, _run_linearize,
                "Replace softmax attention by linear attention (Hedgehog feature maps, optional sliding-window hybrid),"
                " distill it back (attention transfer, then LoRA) and export safetensors.",
                on_interrupt=_interrupted_run)
    add_command(target, "hybridize", HybridizeConfig, _run_hybridize,
                "Keep softmax attention in the layers where converting it costs most (measured) and convert the rest "
                "to linear / sliding-window hybrid attention; distill and export with per-layer scores (scores.json, "
                "scores.png).", first=("ratio", "select", "softmax_layers", "score", "score_tokens"),
                on_interrupt=_interrupted_hybridize)
    add_command(target, "moe-upcycle", MoeUpcycleConfig, _run_moe_upcycle,
                "Turn every dense FFN into a mixture of experts (split or copy), initialise routers from the layers' "
                "inputs, distill from the dense model and export (native Mixtral / Qwen-MoE format where the layout "
                "allows).", on_interrupt=_interrupted_run)
    add_command(target, "eval", EvalConfig, _run_eval,
                "Compare a converted model with its teacher: perplexity, lm-eval tasks, greedy generations, prefill "
                "latency, decode tokens/s, peak memory and cache size over context lengths.", argument="model")


register_commands(app)


def main() -> None:
    """Entry point: a failure is one line on stderr and a non-zero exit code, never a traceback (unless --debug or
    EFFCONV_DEBUG=1 asks for one); Ctrl-C says what can be resumed and exits with 130."""
    from .training import distributed

    if os.environ.get(DEBUG_ENV, "") not in ("", "0", "1"):
        print(f"effconv: error: {DEBUG_ENV}={os.environ[DEBUG_ENV]!r}: use 1 (show tracebacks) or 0", file=sys.stderr)
        sys.exit(1)
    try:
        app()
    except SystemExit as e:  # typer ends a successful command with SystemExit(0)
        if e.code in (None, 0):
            distributed.shutdown()
        raise
    except Interrupted as e:
        if debug_requested():
            raise
        print(f"effconv: {e}", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - every failure becomes one line
        if debug_requested():
            raise
        distributed.report_error(failure_line(e))  # under accelerate launch: once, not once per process
        sys.exit(1)


if __name__ == "__main__":
    main()

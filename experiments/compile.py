"""Will it fit? Compile a training run for a TPU pod slice on this machine, no TPU needed.

    python -m experiments.compile --gin_file=configs/models/llama3_8b.gin \\
        --gin_file=configs/runs/pretrain.gin --gin_file=configs/meshes/tpu_v5p_128.gin \\
        --topology v5p-128 [--num_slices K] [--json report.json] [--dump_hlo DIR] \\
        [--programs train_step] [--gin.X=V ...]

Takes the gin files and `--gin.X=V` bindings of `experiments.train`, builds the run's mesh on the
compile-only devices of --topology (v4-N, v5e-N, v5p-N, v6e-N; --num_slices K for multi-slice
runs, whose mesh file sets dcn_*), compiles the sharded init, the train step and the eval step
with libtpu's TPU compiler, and prints each chip's memory (arguments, outputs, aliased, temp,
total) against its HBM, compile times, the train step's collectives, the model FLOPs per step,
and a verdict. When a program does not fit, the compiler's own figure and the settings that
would shrink it are printed as gin flags to try next.

Exit status: 0 fits, 1 does not fit, 2 the run or the command is wrong (one line on stderr).
Macros a run file leaves for the command line (MODEL_DIR, TRAIN_STEPS, TOKENIZER, ...) need not
be given: nothing is trained, and no data or tokenizer is opened. Needs `pip install 'llamax[tpu]'`.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from experiments.cli import fail

# Macros a run file may leave to the command line, with stand-ins: they name files and step
# counts, none changes a compiled program's shapes.
PLACEHOLDER_MACROS = {"MODEL_DIR": "'/nonexistent/llamax-compile'", "TRAIN_STEPS": "1000000",
                      "CHECKPOINT_EVERY": "1000", "LOG_EVERY": "100", "TOKENIZER": "None",
                      "TRAIN_DATA": "None", "INIT_FROM": "None"}
# How a gin flag spells each config class (the module names the configs/ files import).
GIN_SELECTORS = {"ModelConfig": "config.ModelConfig", "MeshConfig": "sharding.MeshConfig",
                 "OptimConfig": "optim.OptimConfig", "TrainConfig": "fit.TrainConfig"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.compile", add_help=False,
                                     allow_abbrev=False)
    parser.add_argument("--gin_file", action="append", default=[])
    parser.add_argument("--topology", required=True)
    parser.add_argument("--num_slices", type=int, default=1)
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--dump_hlo")
    parser.add_argument("--programs", default="init,train_step,eval_step",
                        help="comma-separated subset of init,train_step,eval_step")
    return parser


def _run_bindings(gin_files: list[str], bindings: list[str]) -> dict:
    """The configs `train.run` would get, without evaluating the data (tokenizers, files).
    Raises GinError (a ConfigError) naming the bad file or binding."""
    from experiments import gin_config, train

    gin_config.parse(gin_files, bindings, required=())
    import gin

    defined, _ = gin_config.macros()
    for macro, stand_in in PLACEHOLDER_MACROS.items():
        if macro not in defined:
            gin.parse_config(f"{macro} = {stand_in}")
    run = gin.get_bindings(train.run, resolve_references=False)
    if run.get("objective") is not None:  # a report on the cross-entropy step would mislead
        raise gin_config.GinError("experiments.compile builds the cross-entropy train step only; this run "
                                  f"sets train.run.objective = {run['objective']}, whose step "
                                  "(policy + reference forward passes) it does not model yet")
    # Deep-copying a gin reference evaluates it: only the configs compiling needs.
    try:
        return {name: copy.deepcopy(run[name]) for name in
                ("model_config", "optim_config", "mesh_config", "train_config", "lora_config") if name in run}
    except gin_config.GIN_ERRORS as error:
        raise gin_config.GinError(gin_config.name_the_binding(gin_config.explain_gin_error(error), bindings)) from error


def gin_flag(setting: str, value) -> str:
    """A knob as a command-line flag: ('ModelConfig.remat_policy', 'full') ->
    --gin.config.ModelConfig.remat_policy="'full'"."""
    if setting == "topology":
        return f"--topology {value}"
    config, field = setting.split(".")
    spelled = f"\"'{value}'\"" if isinstance(value, str) else str(value)
    return f"--gin.{GIN_SELECTORS[config]}.{field}={spelled}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    bindings = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
    args, unknown = _parser().parse_known_args([a for a in argv if not a.startswith("--gin.")])
    if unknown or not args.gin_file:
        return fail(f"{'unexpected arguments ' + ' '.join(unknown) if unknown else 'pass --gin_file=...'}"
                    "; see python -m experiments.compile --help", code=2)

    from llamax.aot.topology import Topology, configure_compile_only_host
    from llamax.errors import ConfigError

    try:
        topology = Topology.parse(args.topology)
    except ConfigError as error:
        return fail(error, code=2)
    configure_compile_only_host(topology)  # before anything initializes JAX's backends
    try:
        run = _run_bindings(args.gin_file, bindings)
    except ConfigError as error:  # GinError too: the file or binding and the fix, one line
        return fail(error, code=2)
    return _compile_and_report(run, topology, args)


def _compile_and_report(run: dict, topology, args: argparse.Namespace) -> int:
    from llamax.aot import compile_run, format_report, memory_knobs
    from llamax.errors import ConfigError
    from llamax.sharding import MeshConfig
    from llamax.train.optim import OptimConfig

    model_config, train_config = run.get("model_config"), run.get("train_config")
    if model_config is None or train_config is None:
        return fail("the gin files bind no train.run model_config/train_config; include a model "
                    "file and a run file (e.g. configs/runs/pretrain.gin)", code=2)
    optim_config = run.get("optim_config") or OptimConfig()
    mesh_config = run.get("mesh_config") or MeshConfig()
    try:
        if mesh_config.num_slices != args.num_slices:
            raise ConfigError(
                f"the mesh config spans {mesh_config.num_slices} slice(s) (dcn_data * dcn_fsdp * "
                f"dcn_tensor) but --num_slices is {args.num_slices}; pass --num_slices "
                f"{mesh_config.num_slices} or set MeshConfig.dcn_data={args.num_slices}")
        report = compile_run(model_config, optim_config, mesh_config, train_config.batch_size,
                             train_config.seq_len, topology, args.num_slices,
                             lora_config=run.get("lora_config"), dump_hlo=args.dump_hlo,
                             programs=tuple(args.programs.split(",")))
    except ValueError as error:  # ConfigError and every llamax error: one line, no traceback
        return fail(f"{type(error).__name__}: {error}", code=2)
    print(format_report(report))
    knobs = [] if report.fits else memory_knobs(report, model_config, optim_config)
    if knobs:
        print("\nto shrink it, try (most effective first):")
        for knob in knobs:
            print("  " + " ".join(gin_flag(s, v) for s, v in knob.settings.items()))
            print(f"      {knob.reason}")
    if args.json_path:
        record = dict(report.to_json(), gin_files=args.gin_file,
                      knobs=[dict(settings=k.settings, reason=k.reason,
                                  flags=[gin_flag(s, v) for s, v in k.settings.items()]) for k in knobs])
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(main())

"""`scope-mega` command line: `sft`, and the other stages as they land.

Config mistakes print one line (`config error: ...`) and exit with status 2 (`CONFIG_ERROR_EXIT_CODE`),
never a traceback; under a launcher (torchrun, srun) only the first rank of each node prints it
(`stage.start_stage`). A checkpoint that cannot be written or read prints `checkpoint error: ...`
(`run_dir.CheckpointError`), also exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from scope_mega.config import ConfigError
from scope_mega.run_dir import CheckpointError
from scope_mega.validation import CONFIG_ERROR_EXIT_CODE, load_config


def _add_run_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("config", help="YAML config file (see examples/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 parallel.tp=2")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    return p


def _print_config(cfg) -> None:
    import yaml

    from scope_mega.config import to_dict

    print(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _cmd_sft(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        _print_config(cfg)
        return 0
    from scope_mega.sft import run_sft

    run_sft(cfg)
    return 0


def _cmd_train(args) -> int:
    if args.dry_run:  # validated for the target device, then the plan (scope_mega/validation.py)
        _dry_run_train(args)
        return 0
    cfg = load_config(args.config, args.overrides)
    from scope_mega.trainer import run_train

    run_train(cfg)
    return 0


def _dry_run_train(args) -> None:
    """The resolved config, its plan for the target device, and whether the trainer can run it."""
    from scope_mega.plan_report import format_plan
    from scope_mega.validation import checked_plan, load_config_for_target, validate

    cfg, target, refusal = load_config_for_target(args.config, args.overrides, args.target)
    _print_config(cfg)
    plan = checked_plan(
        cfg,
        target,
        args.world_size,
        gpu_memory_gib=args.gpu_memory_gib,
        refusal_here=refusal,
        gpus_per_node=args.gpus_per_node,
        host_memory_gib=args.host_memory_gib,
    )
    print(format_plan(plan))
    try:
        validate(cfg, target, plan.world_size, stage="rl")
    except ConfigError as err:  # the layout is valid, but this trainer cannot run it yet
        print(f"trainer: not runnable as configured: {err}")


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Dry-run options of `train`: the target device and the cluster the plan is for."""
    parser.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        default=None,
        help="validate for this device (default: from config)",
    )
    parser.add_argument("--world-size", type=int, default=None, help="GPUs in the job (plan)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (plan)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (host memory plan)")
    parser.add_argument("--host-memory-gib", type=float, default=1024.0, help="host memory per node (plan)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scope-mega", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub, "sft", "supervised warm-start of the policy on the toy task").set_defaults(
        func=_cmd_sft
    )
    train = _add_run_parser(sub, "train", "RL training (GRPO + SCOPE) of the policy")
    train.set_defaults(func=_cmd_train)
    _add_plan_arguments(train)
    from scope_mega.convert import add_convert_parser, add_export_fp8_parser

    add_convert_parser(sub)
    add_export_fp8_parser(sub)
    from scope_mega.eval import add_eval_parser

    add_eval_parser(sub)
    # Overrides may come before or after flags (`CONFIG --dry-run a.b=1`): collect stray key=values.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if "=" not in x or x.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*getattr(args, "overrides", []), *extra]
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE
    except CheckpointError as e:  # a checkpoint that cannot be written or read (scope_mega/checkpointing.py)
        print(f"checkpoint error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())

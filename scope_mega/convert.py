"""`scope-mega convert hf-to-megatron | megatron-to-hf` and `scope-mega export-fp8`: checkpoint
conversion from the command line.

Import runs one process per TP x PP shard: under torchrun or srun (WORLD_SIZE / SLURM_NTASKS equal
to tp*pp) every process converts its shard; started as one plain process it spawns tp*pp local
processes itself. Export runs in one process. Errors print one line and exit with status 2: bad input
is a `ConfigError` (`ConversionError` from the converters and for the arguments here) or what
`models.arch` cannot build (`ArchError`); an `OSError` (a full disk, a folder that cannot be written)
names its file. An error in any spawned process or writer thread reaches this status with its own
line (`runtime.spawn` re-raises the first failing process's exception in the parent). On any error
nothing is left under `--out`'s name, `<out>.tmp-*` included.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import TYPE_CHECKING, NoReturn

from scope_mega.config import ConfigError

if TYPE_CHECKING:
    from scope_mega.weights.files import CreateFile

ERROR_EXIT_CODE = 2
_SIZE_UNITS = {"": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add `convert` with its two directions to an argparse subparsers object."""
    parser = subparsers.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron")
    add_direction_parsers(parser.add_subparsers(dest="direction", required=True))
    parser.set_defaults(func=run_convert)
    return parser


def add_direction_parsers(subparsers) -> None:
    imp = subparsers.add_parser("hf-to-megatron", help="HF safetensors -> Megatron torch_dist checkpoint")
    imp.add_argument("--hf-dir", required=True, help="HF model folder (config.json + safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint folder to create (model/ and hf/ inside)")
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel shards written in parallel")
    imp.add_argument("--pp", type=int, default=1, help="pipeline stages written in parallel")
    imp.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")
    exp = subparsers.add_parser("megatron-to-hf", help="Megatron checkpoint -> HF safetensors")
    exp.add_argument(
        "--megatron-dir",
        required=True,
        help="folder with model/ (converted or trained), or a checkpoints folder or its `latest` marker",
    )
    exp.add_argument("--out", required=True, help="HF model folder to create")
    exp.add_argument("--hf-config", help="folder with the HF config.json (default: <megatron-dir>/hf)")
    exp.add_argument("--max-shard-size", type=parse_size, default="2GB", help="e.g. 2GB, 500MB")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    for p in (imp, exp):
        p.set_defaults(func=run_convert)


def add_export_fp8_parser(subparsers) -> argparse.ArgumentParser:
    """Add `export-fp8`: a trained policy -> an HF FP8 (modelopt) directory that vLLM serves on GPU."""
    from scope_mega.weights.fp8_export import DEFAULT_CALIB_PROMPTS

    p = subparsers.add_parser("export-fp8", help="a trained policy -> HF FP8 weights (modelopt format)")
    p.add_argument("source", help="run directory (its RL policy, else its SFT one) or checkpoint folder")
    p.add_argument("--out", required=True, help="HF model folder to create")
    p.add_argument("--config", help="run config naming the calibration task (default: the checkpoint's)")
    p.add_argument("--calib-prompts", type=int, default=DEFAULT_CALIB_PROMPTS, help="training prompts")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="e.g. 2GB, 500MB")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run_export_fp8)
    return p


def run_export_fp8(args) -> int:
    """Run `export-fp8`; on bad input print one line and return a non-zero status."""
    from scope_mega.models.arch import ArchError
    from scope_mega.weights.fp8_export import export_fp8_checkpoint
    from scope_mega.weights.mapping import ConversionError

    try:
        if args.calib_prompts < 1:
            raise ConversionError(f"--calib-prompts must be >= 1, got {args.calib_prompts}")
        config = None
        if args.config:
            from scope_mega.validation import load_config

            config = load_config(args.config)
        result = export_fp8_checkpoint(
            args.source, args.out, args.force, config, args.calib_prompts, args.max_shard_size
        )
    except (ConfigError, ArchError) as e:
        print(f"export-fp8 error: {e}", file=sys.stderr)
        return ERROR_EXIT_CODE
    worst = max(result.layer_errors, default=0.0)
    print(
        f"wrote {result.out} from {result.source}: calibrated on {result.calib_prompts} prompts "
        f"({result.calib_tokens} tokens); worst layer's relative output error {worst:.2e}"
    )
    return 0


def parse_size(text: str) -> int:
    """`2GB` / `512MiB` / `1000000` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 2GB, 500MB, 1GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def _import(args, create_file: CreateFile) -> None:
    from scope_mega.runtime.spawn import spawn_local
    from scope_mega.weights.hf_to_megatron import import_worker, plan_import
    from scope_mega.weights.mapping import ConversionError

    tp, pp = args.tp, args.pp
    params = (args.hf_dir, args.out, tp, pp, args.force, args.make_vocab_size_divisible_by)
    world = _launched_world_size()
    if world == tp * pp:
        import_worker(*params, create_file)
    elif world == 1:
        plan_import(*params)  # bad input fails here, in one line, before any process starts
        spawn_local(import_worker, tp * pp, *params, create_file)
    else:
        raise ConversionError(
            f"launched {world} processes; --tp {tp} --pp {pp} needs {tp * pp} (or start one)"
        )


def _export(args, create_file: CreateFile) -> None:
    from scope_mega.weights.megatron_to_hf import export_hf_checkpoint

    source, size = args.megatron_dir, args.max_shard_size
    export_hf_checkpoint(source, args.out, args.force, args.hf_config, size, create_file)


def run_convert(args, create_file: CreateFile | None = None) -> int:
    """Run the conversion `args` describe; on failure print one line and return a non-zero status.
    Output files are opened with `create_file` (default: `files.create_for_writing`)."""
    from torch.multiprocessing import ProcessExitedException

    from scope_mega.models.arch import ArchError
    from scope_mega.weights.files import create_for_writing

    try:
        (_import if args.direction == "hf-to-megatron" else _export)(args, create_file or create_for_writing)
    except (ConfigError, ArchError, OSError) as e:
        print(f"convert error: {e}", file=sys.stderr)
        return ERROR_EXIT_CODE
    except ProcessExitedException as e:  # a process that died without raising (a signal)
        print(f"convert error: {e}", file=sys.stderr)
        return ERROR_EXIT_CODE
    if int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0) == 0:
        print(f"wrote {args.out}")
    return 0


def exit_without_teardown(status: int) -> NoReturn:
    """End a conversion process with `status`, skipping the interpreter's teardown of the torch,
    transformers and Megatron modules it imported (about 1.5 s, a tenth of a 1B model's import).
    Safe only once everything is written: a conversion's files are synced and renamed into place
    before it returns, so only the standard streams are left to flush."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)

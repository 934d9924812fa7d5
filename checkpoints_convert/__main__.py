"""`python -m checkpoints_convert {hf-to-megatron,megatron-to-hf} ...`, as `scope-mega convert ...`."""

from __future__ import annotations

import argparse

from scope_mega.convert import add_direction_parsers, exit_without_teardown, run_convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__)
    add_direction_parsers(parser.add_subparsers(dest="direction", required=True))
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    exit_without_teardown(main())

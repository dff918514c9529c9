"""Command line: ``python -m distill_lab <command>`` (also installed as ``distill-lab``)."""

from __future__ import annotations

import argparse
import sys


def _cmd_course(args) -> int:
    from .course import run_course

    out = run_course(args.out, profile=args.profile)
    print(f"report written to {out}/ (results.md, results.json, executed notebooks in notebooks/)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with one sub-command per job."""
    parser = argparse.ArgumentParser(prog="distill-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    course = sub.add_parser("course", help="execute every notebook headless and write a report")
    course.add_argument("--out", default="reports", help="report folder (default: reports)")
    course.add_argument("--profile", default=None,
                        help="smoke, laptop or gpu (default: $DISTILL_LAB_PROFILE, else gpu with CUDA, laptop without)")
    course.set_defaults(func=_cmd_course)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse arguments, run the command, turn expected errors into one-line messages."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"distill-lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

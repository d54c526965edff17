"""The `dinrec` command line: parse arguments, call the library, print.

Each sub-command has an ``_add_<name>`` function that declares its arguments and a
``_run_<name>`` function that does the work; errors of type :class:`DinrecError`
are printed as one line (no stack trace) with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dinrec import __version__
from dinrec.errors import DinrecError


# --------------------------------------------------------------------------- demo
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded synthetic data")
    p.add_argument(
        "--seed-example",
        action="store_true",
        help="run the seed document's din_fcn_attention demo with its exact inputs",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from dinrec.seed_demo import run_seed_demo

    if args.seed_example:
        print(run_seed_demo())
        return 0
    raise DinrecError("the full demo is not built yet; try `dinrec demo --seed-example`")


# --------------------------------------------------------------------------- main
_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dinrec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DinrecError as exc:
        print(f"dinrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dinrec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

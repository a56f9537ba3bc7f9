"""The `testbed` command line."""

from __future__ import annotations

import argparse
import sys

from testbed.errors import TestbedError


def cmd_image_build(args: argparse.Namespace) -> int:
    from testbed.image import build_agent_image
    build_agent_image(force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    image = sub.add_parser("image", help="the agent container image").add_subparsers(
        dest="image_command", required=True)
    build = image.add_parser("build", help="build the agent image if it is missing or stale")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_image_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

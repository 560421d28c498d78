"""The `sdxl` command line. Bad input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import SDXLError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"format:        {info['format']}")
    print(f"architecture:  {info['architecture']}")
    print(f"dtype:         {info['dtype']}")
    print("components:")
    for name, c in info["components"].items():
        print(f"  {name:<16}{c['params']:>16,} parameters")
    for label in ("missing_keys", "unexpected_keys", "wrong_shapes"):
        keys = info[label]
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        print(f"{label.replace('_', ' ') + ':':<18}{len(keys)}{' (' + shown + ')' if keys else ''}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl", description="Stable Diffusion XL: inspect checkpoints, generate, train.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    q = sub.add_parser("inspect", help="read a checkpoint's headers: format, architecture, dtype, parameters, key check")
    q.add_argument("path", help="a single-file .safetensors checkpoint or a diffusers folder")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SDXLError as e:
        print(f"sdxl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdxl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""The Cosmos 3 browser demo: `python demos/app.py [--model PATH] [--host 127.0.0.1] [--port 7860] [--device cpu]`.

A thin entry point: the page lives in `cosmos3.demo` (also `cosmos3 demo`), so the installed package and this
script serve the same app. Without `--model` it runs Cosmos3-Tiny, the small trained model shipped in the package.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    from cosmos3.demo import add_demo_arguments, run_demo

    parser = argparse.ArgumentParser(prog="demos/app.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_demo_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_demo(args)
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"demos/app.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

"""`make demo` entry: see mole_serve/demo/cli.py, or run with --help."""

import sys

from mole_serve.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())

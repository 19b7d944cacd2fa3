"""``python -m multibox.bench``: the same as ``multibox bench`` (SPEC §5)."""
import sys

# The one upward import of the package (bench -> cli, allowed in pyproject.toml's import-linter contract): the
# command line parses and reports, and ``python -m multibox.bench`` must behave exactly as ``multibox bench``.
from multibox.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))

"""``python -m multibox`` (also what ``torchrun -m multibox`` runs)."""
import sys

from multibox.cli import main

sys.exit(main())

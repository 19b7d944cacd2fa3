"""``python -m multibox`` (also what ``torchrun -m multibox`` runs)."""
import sys

from .cli import main

sys.exit(main())

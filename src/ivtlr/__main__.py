"""``python -m ivtlr`` (what ``accelerate launch -m ivtlr`` runs)."""
import sys

from .cli import main

sys.exit(main())

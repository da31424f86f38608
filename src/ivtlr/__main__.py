"""``python -m ivtlr`` (what ``accelerate launch -m ivtlr`` runs)."""
import sys

from ivtlr.cli import main

sys.exit(main())

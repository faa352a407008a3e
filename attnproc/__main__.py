"""``python -m attnproc`` (also what ``accelerate launch -m attnproc`` runs)."""
import sys

from attnproc.workflows.cli import main

sys.exit(main())

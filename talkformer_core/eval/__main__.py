"""``python -m talkformer_core.eval`` (see eval/cli.py)."""
import sys

from .cli import main

sys.exit(main())

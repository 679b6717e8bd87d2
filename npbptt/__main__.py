"""``python -m npbptt ...``: the ``npbptt`` command (:mod:`npbptt.cli`)."""
import sys

from .cli import main

sys.exit(main())

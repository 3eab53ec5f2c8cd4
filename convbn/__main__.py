"""``python -m convbn`` is the ``convbn`` command."""

import sys

from convbn.cli import main

sys.exit(main())

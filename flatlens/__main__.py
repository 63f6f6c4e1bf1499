"""``python -m flatlens`` runs the ``flatlens`` command."""

import sys

from flatlens.cli import main

sys.exit(main())

"""``python -m cachedfeatures``: the same command line as the ``cachedfeatures`` script."""

import sys

from cachedfeatures.cli import main

sys.exit(main())

"""``python -m cachedfeatures``: the same command line as the ``cachedfeatures`` script.

Layer: entry points (see "Layout" in the README).
"""

import sys

from cachedfeatures.cli import main

sys.exit(main())

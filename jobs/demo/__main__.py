"""``python -m jobs.demo``: the same as ``lrp-audit demo``."""
import sys

from jobs.demo import main

sys.exit(main())

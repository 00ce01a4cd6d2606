"""``python -m dpt_lightning.bench`` = ``dpt-bench``."""
import sys

from dpt_lightning.bench.command import main

sys.exit(main())

"""``python -m ckpt_async``: the ``ckpt-async`` command line (see ``ckpt_async.cli``)."""

import sys

from .cli import main

sys.exit(main())

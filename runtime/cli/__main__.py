"""`python -m runtime.cli ARGS`: the `nanogpt-deploy` command without its console script."""
import sys

from . import main

sys.exit(main())

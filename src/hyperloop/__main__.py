import sys

from hyperloop.cli import main

sys.exit(main())

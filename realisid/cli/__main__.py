import sys

from realisid.cli import main

sys.exit(main())

import sys

from discq.cli import main

sys.exit(main())

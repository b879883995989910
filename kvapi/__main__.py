import sys

from kvapi.cli import main

sys.exit(main())

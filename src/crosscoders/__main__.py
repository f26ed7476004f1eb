import sys

from crosscoders.cli import main

sys.exit(main())

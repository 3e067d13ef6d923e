import sys

from adaroute.cli import main

sys.exit(main())

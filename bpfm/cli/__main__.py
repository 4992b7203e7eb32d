import sys

from bpfm.cli import main

sys.exit(main())

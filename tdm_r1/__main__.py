import sys

from tdm_r1.cli import main

sys.exit(main())

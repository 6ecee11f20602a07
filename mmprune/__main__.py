import sys

from mmprune.cli import main

sys.exit(main())

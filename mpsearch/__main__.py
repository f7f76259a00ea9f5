import sys

from mpsearch.service.cli import main

sys.exit(main())

import sys

from lhtstream.cli.parser import main

sys.exit(main())

import sys

from lhtstream.service.startup import exit_on_stop_signals

exit_on_stop_signals()  # first: a SIGTERM during the imports below exits 0 with a line

from lhtstream.cli.parser import main  # noqa: E402

sys.exit(main())

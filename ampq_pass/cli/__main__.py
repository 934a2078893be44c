import sys

from ampq_pass.cli.main import main

sys.exit(main())

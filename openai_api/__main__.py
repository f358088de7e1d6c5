import sys

from openai_api.server import main

sys.exit(main())

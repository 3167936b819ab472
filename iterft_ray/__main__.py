import sys

from iterft_ray.cli import main

sys.exit(main())

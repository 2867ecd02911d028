"""``python -m unet_jax.predict``."""

import sys

from unet_jax.predict.cli import main

sys.exit(main())

"""``python -m vae_deploy ...`` is the ``vae-deploy`` command (also ``torchrun ... -m vae_deploy train ...``)."""

import sys

from vae_deploy.cli import main

sys.exit(main())

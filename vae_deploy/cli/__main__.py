"""``python -m vae_deploy.cli ...`` is the ``vae-deploy`` command (so is ``torchrun ... -m vae_deploy.cli train``)."""

import sys

from vae_deploy.cli import main

sys.exit(main())

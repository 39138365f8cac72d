"""The TOML training recipes, one per reference setup; installed as ``vae_deploy.recipes``."""

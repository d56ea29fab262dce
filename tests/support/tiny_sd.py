"""The tiny Stable Diffusion factory lives in the package (the demo uses it too); tests import it from here."""

from ocrbooth.models.dreambooth.tiny import build_tiny_sd, make_instance_images

__all__ = ["build_tiny_sd", "make_instance_images"]

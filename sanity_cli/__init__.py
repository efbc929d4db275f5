"""sanity: sanity checks for saliency maps (Adebayo et al., NeurIPS 2018)."""

from sanity_cli.methods import explain

__all__ = ["explain"]
__version__ = "0.1.0"

"""sanity: sanity checks for saliency maps (Adebayo et al., NeurIPS 2018).

    from sanity_cli import check, explain
"""

from sanity_cli.methods import explain

__all__ = ["check", "explain"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline (pandas, Hydra, figures) loads on first use of check(), not on import.
    if name == "check":
        from sanity_cli.api import check

        return check
    raise AttributeError(f"module 'sanity_cli' has no attribute {name!r}")

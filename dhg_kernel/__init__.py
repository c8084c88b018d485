"""dhg_kernel: Deephaven in Jupyter, one microVM away.

``%load_ext dhg_kernel`` registers the ``%%dhvm`` cell magic and ``%dhvm`` line magic.
Kept light: importing the package does not import IPython, pandas or Deephaven.
"""

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    """Register the ``%%dhvm`` / ``%dhvm`` magics (``%load_ext dhg_kernel``)."""
    from .magic import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """Stop the magic's session (``%unload_ext dhg_kernel``)."""
    from .magic import unload

    unload(ipython)

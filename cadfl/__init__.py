"""cadfl: context-aware distributed learning (CAD) of CNNs across mobile devices."""

__version__ = "0.1.0"

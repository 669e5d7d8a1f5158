"""screenline: batch screening of 64×64 medical images, orchestrated by Prefect."""

__version__ = "0.1.0"

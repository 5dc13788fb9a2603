"""kdsec: distil, compress, encrypt and audit small models; promote them only through gates.

The library is plain Python + torch. Orchestration (Prefect) lives in ``tasks/`` and ``flows/``.
"""

__version__ = "0.1.0"

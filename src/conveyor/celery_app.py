"""The Celery app of a Conveyor deployment, for Celery's own command line and tools.

``celery -A conveyor.celery_app worker`` runs the built-in service's task types (or those of
``CONVEYOR_APP=module:attribute``), configured from ``CONVEYOR_*`` like ``conveyor worker``;
``celery -A conveyor.celery_app inspect active`` and Flower see the same workers.
"""

from __future__ import annotations

import os

from .loader import load_yard
from .service import build_yard
from .settings import Settings

yard = (
    load_yard(os.environ["CONVEYOR_APP"])
    if os.environ.get("CONVEYOR_APP")
    else build_yard(Settings())
)
app = yard.celery_app()

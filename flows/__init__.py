"""Prefect flows: thin wrappers that call `fusion` stages and add orchestration.

Modules that define flows or tasks do not use `from __future__ import annotations`: Prefect
validates parameters from the annotations, and in a deployment's process string annotations such
as "TilingConfig" may not resolve.
"""

import os

# Prefect reads settings at import: switch off telemetry before any flow module imports it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's own temporary server (deployments, tests) gives up after 20 s: too short on a loaded machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

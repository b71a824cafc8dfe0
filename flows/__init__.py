"""Prefect flows: thin wrappers that call `fusion` stages and add orchestration."""

import os

# Prefect reads settings at import: switch off telemetry before any flow module imports it.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

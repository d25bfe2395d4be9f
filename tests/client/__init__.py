"""Tests of the site agent's local training: datasets, built-in tasks, hosted Flower apps."""

import os

# Before any test module here imports flwr (it reads the telemetry switch at import).
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"

"""Drift on the device: reference profiles of a model's data and live sliding-window sketches (pure numpy)."""

from __future__ import annotations

from edgert.drift.monitor import DriftAlarm, DriftMonitor, DriftSettings
from edgert.drift.profile import ReferenceProfile, build_profile

__all__ = ["DriftAlarm", "DriftMonitor", "DriftSettings", "ReferenceProfile", "build_profile"]

"""edgert.metrics: mergeable quantile sketches, the Prometheus registry and process statistics."""

from edgert.metrics.registry import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics
from edgert.metrics.sketch import QuantileSketch

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "Metrics", "QuantileSketch"]

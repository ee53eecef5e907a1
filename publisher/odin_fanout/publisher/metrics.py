"""The publisher's Prometheus metrics, read from the service at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from odin_fanout.publisher.service import PublisherService


class _ServiceCollector(Collector):
    def __init__(self, service: PublisherService) -> None:
        self._service = service

    def collect(self) -> Iterable[Metric]:
        service = self._service
        broker = service.broker
        stats = broker.stats()
        counters: tuple[tuple[str, float, str], ...] = (
            ("odin_publisher_published", stats.published,
             "Events JetStream acknowledged (stored)."),
            ("odin_publisher_failed", stats.publish_failed,
             "Publishes refused (NATS down, queue full) or lost after their retries."),
            ("odin_publisher_retries", stats.publish_retries,
             "Publishes sent again, with the same message id, after no acknowledgement."),
            ("odin_publisher_dropped", stats.publish_dropped,
             "Publishes given up after retrying past their bound (also in failed)."),
            ("odin_publisher_generated", service.simulator.published,
             "Events generated and handed to NATS."),
            ("odin_publisher_skipped", service.simulator.skipped,
             "Events not generated because publishing fell more than a burst behind."),
            ("odin_publisher_statistics_failed", service.statistics_failed,
             "Market statistics that could not be published."),
        )  # fmt: skip
        for name, value, text in counters:
            yield CounterMetricFamily(name, text, value)
        gauges: tuple[tuple[str, float, str], ...] = (
            ("odin_publisher_publishing", int(service.publishing), "1 while publishing."),
            ("odin_publisher_rate_target", service.targets.rate if service.publishing else 0,
             "The configured events per second while publishing, else 0."),
            ("odin_publisher_rate", service.achieved_rate(),
             "Acknowledged events per second over the last 10 s."),
            ("odin_publisher_tokens", len(service.targets.tokens), "Tokens being simulated."),
            ("odin_publisher_retrying", stats.publish_retrying,
             "Publishes being retried now (the queue waits behind them)."),
            ("odin_publisher_in_flight", stats.publish_in_flight,
             "Publishes handed to NATS and not yet settled (stored or counted failed)."),
            ("odin_publisher_nats_connected", int(broker.status().connected),
             "1 while connected to NATS with the stream known."),
        )  # fmt: skip
        for name, value, text in gauges:
            yield GaugeMetricFamily(name, text, value)


def build_registry(service: PublisherService) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(_ServiceCollector(service))
    return registry


def render(registry: CollectorRegistry, accept_header: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept_header or "")
    return encoder(registry), content_type

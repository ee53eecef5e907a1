"""Odin's publisher: the original's price simulator and HTTP control API, publishing into NATS
JetStream through Odin's NATS bridge."""

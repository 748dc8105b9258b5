"""Durable Streams (seed 004's protocol) in chatd: streams kept in Postgres,
live readers woken by chatd's own fan-out. See docs/durable-streams.md."""

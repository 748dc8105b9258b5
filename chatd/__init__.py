"""chatd: a real-time chat state engine on Trio (Postgres is the truth, Redis the transport)."""

__version__ = "0.1.0"

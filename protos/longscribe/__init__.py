"""longscribe: gRPC batch transcription for long media."""

__version__ = "0.1.0"

"""tokensvc: OAuth client-credentials tokens for MCP brokers, over gRPC."""

__version__ = "0.1.0"

"""guardd: a policy-checked DNS resolver and SOCKS5 proxy for the outbound traffic of AI agents."""

__version__ = "0.1.0"

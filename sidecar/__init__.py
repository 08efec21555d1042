"""stepup-sidecar: an Envoy ext_authz server that allows, denies or asks for step-up (RFC 9470)."""

__version__ = "0.1.0"

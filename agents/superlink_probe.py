"""Is the SuperLink there, and is it the one the agent trusts: a TCP connection, then a TLS handshake
that verifies its certificate exactly as the SuperNode will. ``fedlite agent check`` reports it;
``fedlite agent run`` waits on ``unreachable`` and stops on ``tls-failed``, which waiting cannot fix.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from fedlite.agents.agent_config import AgentConfig
from fedlite.agents.config_values import parse_address

CONNECTED, UNREACHABLE, TLS_FAILED = "connected", "unreachable", "tls-failed"


@dataclass(frozen=True)
class ProbeResult:
    """What the SuperLink's port said: ``connected``, ``unreachable`` (worth waiting for) or
    ``tls-failed`` (a configuration to fix)."""

    outcome: str
    detail: str
    hint: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == CONNECTED


def tls_context(root_certificate: Path | None) -> ssl.SSLContext:
    """Verifies the server's chain against ``root_certificate`` (else the system's CAs) and its name."""
    if root_certificate is None:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=str(root_certificate))


def probe_superlink(address: str, root_certificate: Path | None = None, insecure: bool = False,
                    timeout: float = 5.0) -> ProbeResult:
    """TCP connect, then (unless ``insecure``) a TLS handshake verifying the SuperLink's certificate."""
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        return ProbeResult(UNREACHABLE, f"cannot resolve {host} ({exc.strerror})",
                           "check the host name in superlink.address and this server's DNS")
    except ConnectionRefusedError:
        return ProbeResult(UNREACHABLE, "connection refused",
                           f"is flower-superlink running and listening on port {port}?")
    except (socket.timeout, TimeoutError):
        return ProbeResult(UNREACHABLE, f"no answer within {timeout:g} s",
                           "the SuperLink is down or a firewall drops the traffic")
    except OSError as exc:
        return ProbeResult(UNREACHABLE, exc.strerror or str(exc), "check the network route to the SuperLink")
    with sock:
        if insecure:
            return ProbeResult(CONNECTED, "TCP connection accepted (insecure: no TLS, the SuperLink is not "
                                          "authenticated)")
        try:
            context = tls_context(root_certificate)
        except (OSError, ssl.SSLError) as exc:
            return ProbeResult(TLS_FAILED, f"cannot load the root certificate {root_certificate}: "
                                           f"{getattr(exc, 'strerror', None) or exc}",
                               "superlink.root_certificate must be a readable PEM CA certificate")
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                version = tls.version()
        except ssl.SSLCertVerificationError as exc:
            return ProbeResult(TLS_FAILED, f"TLS handshake failed: certificate verify failed: {exc.verify_message}",
                               f"superlink.root_certificate must be the CA that signed the SuperLink's "
                               f"certificate, and that certificate must name {host}")
        except (ssl.SSLEOFError, ConnectionResetError):
            return ProbeResult(UNREACHABLE, "the connection closed during the TLS handshake",
                               "the SuperLink may be restarting")
        except ssl.SSLError as exc:
            return ProbeResult(TLS_FAILED, f"TLS handshake failed: {exc.reason or exc}",
                               "does the SuperLink serve TLS? (it does unless started with --insecure)")
        except (socket.timeout, TimeoutError):
            return ProbeResult(UNREACHABLE, f"TCP connected, but no TLS handshake within {timeout:g} s",
                               "the SuperLink is overloaded, or something else listens on that port")
        except OSError as exc:
            return ProbeResult(UNREACHABLE, f"TLS handshake interrupted: {exc.strerror or exc}")
    return ProbeResult(CONNECTED, f"connected, {version}, certificate verified for {host}")


def probe_config(config: AgentConfig, timeout: float = 5.0) -> ProbeResult:
    link = config.superlink
    return probe_superlink(link.address, link.root_certificate, link.insecure, timeout)

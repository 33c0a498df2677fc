"""Transport security shared by every service: TLS on the port a service serves (mutual TLS when it asks
for client certificates) and on the channels it opens to the services behind it.

Certificates and keys are PEM files: mounted from a Kubernetes Secret, or any path. A service that is
given none serves and dials plaintext; the gateway, the public entry, refuses to start that way unless
it is told `--plaintext` (local runs: `strata up`, docker-compose)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from services.common.config import env


class TlsConfigError(ValueError):
    """The TLS files or flags do not fit together (the message names the flag)."""


@dataclass(slots=True, frozen=True)
class TlsConfig:
    cert_file: str = ""          # serve TLS with this certificate chain ...
    key_file: str = ""           # ... and its private key
    client_ca_file: str = ""     # serving: require client certificates signed by this CA (mutual TLS)
    ca_file: str = ""            # dialing: TLS to the services behind, their certificates signed by this CA
    client_cert_file: str = ""   # dialing: present this certificate (for their mutual TLS) ...
    client_key_file: str = ""    # ... and its key
    server_name: str = ""        # dialing: the name expected in their certificates (default: the host dialed)

    @property
    def serves_tls(self) -> bool:
        return bool(self.cert_file)

    @property
    def dials_tls(self) -> bool:
        return bool(self.ca_file)

    def validate(self) -> None:
        pairs = (("--tls-cert", self.cert_file, "--tls-key", self.key_file),
                 ("--tls-client-cert", self.client_cert_file, "--tls-client-key", self.client_key_file))
        for a, av, b, bv in pairs:
            if bool(av) != bool(bv):
                raise TlsConfigError(f"{a} and {b} go together: give both or neither")
        if self.client_ca_file and not self.cert_file:
            raise TlsConfigError("--tls-client-ca (mutual TLS) needs the server's own --tls-cert and --tls-key")
        if self.client_cert_file and not self.ca_file:
            raise TlsConfigError("--tls-client-cert needs --tls-ca: client certificates are only sent over TLS")
        for flag, path in (("--tls-cert", self.cert_file), ("--tls-key", self.key_file),
                           ("--tls-client-ca", self.client_ca_file), ("--tls-ca", self.ca_file),
                           ("--tls-client-cert", self.client_cert_file), ("--tls-client-key", self.client_key_file)):
            if path and not Path(path).is_file():
                raise TlsConfigError(f"{flag}: no such file {path!r}")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """None when this service serves plaintext."""
        if not self.serves_tls:
            return None
        chain = [(_read(self.key_file), _read(self.cert_file))]
        if self.client_ca_file:
            return grpc.ssl_server_credentials(chain, root_certificates=_read(self.client_ca_file),
                                               require_client_auth=True)
        return grpc.ssl_server_credentials(chain)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """None when this service dials plaintext."""
        if not self.dials_tls:
            return None
        key = _read(self.client_key_file) if self.client_key_file else None
        cert = _read(self.client_cert_file) if self.client_cert_file else None
        return grpc.ssl_channel_credentials(_read(self.ca_file), key, cert)

    def channel(self, target: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """An aio channel to `target`, TLS when --tls-ca is set."""
        creds = self.channel_credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options))
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(target, creds, options=opts)


PLAINTEXT = TlsConfig()


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def add_tls_args(p: argparse.ArgumentParser) -> None:
    """--tls-* flags (STRATA_TLS_* environment variables) for serving and dialing."""
    p.add_argument("--tls-cert", default=env("STRATA_TLS_CERT", ""),
                   help="serve TLS with this PEM certificate chain (env STRATA_TLS_CERT)")
    p.add_argument("--tls-key", default=env("STRATA_TLS_KEY", ""), help="its PEM private key (env STRATA_TLS_KEY)")
    p.add_argument("--tls-client-ca", default=env("STRATA_TLS_CLIENT_CA", ""),
                   help="mutual TLS: accept only clients whose certificate this PEM CA signed (env STRATA_TLS_CLIENT_CA)")
    p.add_argument("--tls-ca", default=env("STRATA_TLS_CA", ""),
                   help="dial the services behind this one over TLS, trusting this PEM CA (env STRATA_TLS_CA)")
    p.add_argument("--tls-client-cert", default=env("STRATA_TLS_CLIENT_CERT", ""),
                   help="the certificate this service presents when it dials (their mutual TLS; env STRATA_TLS_CLIENT_CERT)")
    p.add_argument("--tls-client-key", default=env("STRATA_TLS_CLIENT_KEY", ""),
                   help="its private key (env STRATA_TLS_CLIENT_KEY)")
    p.add_argument("--tls-server-name", default=env("STRATA_TLS_SERVER_NAME", ""),
                   help="the name expected in the dialed services' certificates (default: the host dialed; "
                        "env STRATA_TLS_SERVER_NAME)")


def tls_from_args(a: argparse.Namespace) -> TlsConfig:
    cfg = TlsConfig(cert_file=a.tls_cert, key_file=a.tls_key, client_ca_file=a.tls_client_ca, ca_file=a.tls_ca,
                    client_cert_file=a.tls_client_cert, client_key_file=a.tls_client_key,
                    server_name=a.tls_server_name)
    try:
        cfg.validate()
    except TlsConfigError as exc:
        raise SystemExit(str(exc)) from None
    return cfg

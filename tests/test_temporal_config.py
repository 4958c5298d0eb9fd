"""The Temporal connection comes from the SDK's environment configuration, with no code change.

`upsertflow.temporal.connect_config()` reads the standard `TEMPORAL_*` variables (and a TOML
profile) through `temporalio.envconfig`; `connect()` hands the result to `Client.connect`.
Each test gives the variables explicitly (`env=`), as a container or an env file would.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.contrib.pydantic import PydanticPayloadConverter
from temporalio.service import TLSConfig

from upsertflow import temporal


@pytest.fixture(autouse=True)
def no_user_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any `~/.config/temporalio/temporal.toml` of the machine: the SDK reads it by default."""
    config_home = tmp_path / "config-home"
    config_home.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.setenv("HOME", str(tmp_path))


@dataclass(frozen=True)
class ClientCertificates:
    """A CA and a client certificate it signed, as PEM files."""

    ca_cert: Path
    client_cert: Path
    client_key: Path

    def env(self) -> dict[str, str]:
        """The mTLS variables of the SDK's environment configuration, pointing at the files."""
        return {
            "TEMPORAL_ADDRESS": "upsertflow.a1b2c.tmprl.cloud:7233",
            "TEMPORAL_NAMESPACE": "upsertflow.a1b2c",
            "TEMPORAL_TLS_CLIENT_CERT_PATH": str(self.client_cert),
            "TEMPORAL_TLS_CLIENT_KEY_PATH": str(self.client_key),
            "TEMPORAL_TLS_SERVER_CA_CERT_PATH": str(self.ca_cert),
        }


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> ClientCertificates:
    """Generate a throwaway CA and client certificate with the `openssl` CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl CLI is not installed")
    directory = tmp_path_factory.mktemp("certs")
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", *ec_key, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=ca")
    run("req", *ec_key, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=worker")
    run(
        "x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-set_serial", "1", "-days", "1", "-out", "client.pem",
    )  # fmt: skip
    return ClientCertificates(
        ca_cert=directory / "ca.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )


def test_nothing_set_means_the_local_dev_server() -> None:
    config = temporal.connect_config(env={})

    assert config == {"target_host": "localhost:7233"}


def test_address_and_namespace() -> None:
    config = temporal.connect_config(
        env={"TEMPORAL_ADDRESS": "temporal.internal:7233", "TEMPORAL_NAMESPACE": "upsertflow"}
    )

    assert config["target_host"] == "temporal.internal:7233"
    assert config["namespace"] == "upsertflow"
    assert "tls" not in config
    assert "api_key" not in config


def test_the_process_environment_is_read_when_no_env_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEMPORAL_ADDRESS", "from-the-environment:7233")
    monkeypatch.setenv("TEMPORAL_NAMESPACE", "upsertflow")

    config = temporal.connect_config()

    assert config["target_host"] == "from-the-environment:7233"
    assert config["namespace"] == "upsertflow"


def test_an_api_key_turns_tls_on() -> None:
    config = temporal.connect_config(
        env={
            "TEMPORAL_ADDRESS": "us-east-1.aws.api.temporal.io:7233",
            "TEMPORAL_NAMESPACE": "upsertflow.a1b2c",
            "TEMPORAL_API_KEY": "secret-key",
        }
    )

    assert config["api_key"] == "secret-key"
    assert config["tls"] is True


def test_tls_can_be_turned_off_explicitly() -> None:
    config = temporal.connect_config(
        env={"TEMPORAL_API_KEY": "secret-key", "TEMPORAL_TLS": "false"}
    )

    assert config["api_key"] == "secret-key"
    assert config["tls"] is False


def test_mtls_reads_the_certificate_files(certificates: ClientCertificates) -> None:
    config = temporal.connect_config(env=certificates.env())

    assert config["target_host"] == "upsertflow.a1b2c.tmprl.cloud:7233"
    assert config["namespace"] == "upsertflow.a1b2c"
    tls = config["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.client_cert == certificates.client_cert.read_bytes()
    assert tls.client_private_key == certificates.client_key.read_bytes()
    assert tls.server_root_ca_cert == certificates.ca_cert.read_bytes()
    assert tls.client_cert.startswith(b"-----BEGIN CERTIFICATE-----")


def test_mtls_server_name_override(certificates: ClientCertificates) -> None:
    env = certificates.env() | {"TEMPORAL_TLS_SERVER_NAME": "temporal.internal"}

    tls = temporal.connect_config(env=env)["tls"]

    assert isinstance(tls, TLSConfig)
    assert tls.domain == "temporal.internal"


def test_grpc_metadata_headers() -> None:
    config = temporal.connect_config(env={"TEMPORAL_GRPC_META_X_TENANT": "acme"})

    assert config["rpc_metadata"] == {"x-tenant": "acme"}


def test_a_toml_profile_with_environment_overrides(tmp_path: Path) -> None:
    config_file = tmp_path / "temporal.toml"
    config_file.write_text(
        """
[profile.default]
address = "localhost:7233"

[profile.production]
address = "temporal.internal:7233"
namespace = "upsertflow"
api_key = "profile-key"

[profile.production.tls]
server_name = "temporal.internal"
""".lstrip()
    )
    env = {"TEMPORAL_CONFIG_FILE": str(config_file), "TEMPORAL_PROFILE": "production"}

    config = temporal.connect_config(env=env)

    assert config["target_host"] == "temporal.internal:7233"
    assert config["namespace"] == "upsertflow"
    assert config["api_key"] == "profile-key"
    tls = config["tls"]
    assert isinstance(tls, TLSConfig)
    assert tls.domain == "temporal.internal"

    # A variable wins over the profile, as the SDK documents.
    overridden = temporal.connect_config(env=env | {"TEMPORAL_NAMESPACE": "upsertflow-staging"})
    assert overridden["namespace"] == "upsertflow-staging"
    assert overridden["target_host"] == "temporal.internal:7233"


def test_an_unknown_profile_is_an_error(tmp_path: Path) -> None:
    config_file = tmp_path / "temporal.toml"
    config_file.write_text('[profile.default]\naddress = "localhost:7233"\n')

    with pytest.raises(RuntimeError, match="Profile 'missing' not found"):
        temporal.connect_config(
            env={"TEMPORAL_CONFIG_FILE": str(config_file), "TEMPORAL_PROFILE": "missing"}
        )


async def test_connect_hands_the_mtls_settings_to_the_client(
    certificates: ClientCertificates,
) -> None:
    # lazy=True: the client is configured without a network round trip.
    client = await temporal.connect(env=certificates.env(), lazy=True)

    config = client.service_client.config
    assert config.target_host == "upsertflow.a1b2c.tmprl.cloud:7233"
    assert client.namespace == "upsertflow.a1b2c"
    assert isinstance(config.tls, TLSConfig)
    assert config.tls.client_cert == certificates.client_cert.read_bytes()
    assert config.tls.client_private_key == certificates.client_key.read_bytes()
    assert config.tls.server_root_ca_cert == certificates.ca_cert.read_bytes()
    assert client.api_key is None
    assert client.data_converter.payload_converter_class is PydanticPayloadConverter


async def test_connect_hands_the_api_key_to_the_client() -> None:
    env = {
        "TEMPORAL_ADDRESS": "us-east-1.aws.api.temporal.io:7233",
        "TEMPORAL_NAMESPACE": "upsertflow.a1b2c",
        "TEMPORAL_API_KEY": "secret-key",
    }

    client = await temporal.connect(env=env, lazy=True)

    assert client.api_key == "secret-key"
    assert client.service_client.config.api_key == "secret-key"
    assert client.service_client.config.tls is True
    assert client.namespace == "upsertflow.a1b2c"

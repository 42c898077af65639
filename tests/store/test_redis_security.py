"""Redis with an ACL user and over TLS (rediss://), against real redis-servers started here.

The certificate is self-signed, made with the ``openssl`` command for each test session; a
redis-server built without TLS, or a machine without openssl, skips the TLS tests with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from shadowserve.errors import ConfigError, StoreError
from shadowserve.store import open_store
from shadowserve.store.launch import RedisTLS, redis_available, start_redis, start_redis_cluster

pytestmark = pytest.mark.skipif(not redis_available()[0], reason=redis_available()[1])

USER, PASSWORD = "tenant", "p@ss:w/rd"  # characters a URL must percent-encode
QUOTED = "p%40ss%3Aw%2Frd"
ACL = ["--user", "default", "off", "--user", USER, "on", f">{PASSWORD}", "~*", "+@all"]


def _round_trip(url: str) -> None:
    store = open_store(url)
    try:
        key = os.urandom(16)
        store.put(key, b"chunk" * 100)
        buf = bytearray(500)
        assert store.get_into(key, buf) == 500 and bytes(buf) == b"chunk" * 100
        assert store.contains([key, os.urandom(16)]) == [True, False]
    finally:
        store.close()


@pytest.fixture(scope="module")
def acl_redis():
    server = start_redis(extra_args=ACL)
    yield server.url.removeprefix("redis://")  # host:port/0
    server.stop()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed (apt-get install -y openssl)")
    d = tmp_path_factory.mktemp("tls")
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return RedisTLS(cert, key, cert)


@pytest.fixture(scope="module")
def tls_redis(tls_files):
    try:
        server = start_redis(tls=tls_files, extra_args=ACL)
    except StoreError as exc:
        pytest.skip(f"redis-server would not start with --tls-port (built without TLS?): {exc}")
    yield server
    server.stop()


def test_acl_user_and_password_from_the_url(acl_redis):
    _round_trip(f"redis://{USER}:{QUOTED}@{acl_redis}")


@pytest.mark.parametrize("auth, who", [(f"{USER}:wrong@", f"user '{USER}'"), ("", "the default user")])
def test_wrong_or_missing_password_is_a_clear_store_error(acl_redis, auth, who):
    with pytest.raises(StoreError, match=f"refused {who}") as info:
        open_store(f"redis://{auth}{acl_redis}")
    assert "wrong" not in str(info.value)  # the password given is never repeated


def test_tls_with_the_servers_ca(tls_redis):
    url = tls_redis.url.replace("rediss://", f"rediss://{USER}:{QUOTED}@")
    assert url.startswith("rediss://") and "ssl_ca_certs=" in url
    _round_trip(url)


def test_tls_without_trusting_its_ca_fails_fast(tls_redis):
    bare = tls_redis.url.split("?")[0].replace("rediss://", f"rediss://{USER}:{QUOTED}@")
    start = time.monotonic()
    with pytest.raises(StoreError, match="(?i)certificate verify failed"):
        open_store(bare + "?connect_timeout=2s")  # the system's CAs do not know a self-signed cert
    _round_trip(bare + "?ssl_cert_reqs=none")  # unless told, explicitly, not to verify
    with pytest.raises(StoreError, match="cannot connect"):  # plain TCP to a TLS port
        open_store(bare.replace("rediss://", "redis://") + "?connect_timeout=1s&timeout=2s")
    assert time.monotonic() - start < 15


def test_tls_cluster(tls_files):
    try:
        cluster = start_redis_cluster(masters=3, tls=tls_files)
    except StoreError as exc:
        pytest.skip(f"no TLS redis cluster here: {exc}")
    try:
        assert cluster.url.startswith("rediss+cluster://")
        _round_trip(cluster.url)
        store = open_store(cluster.url)
        assert store.stats()["nodes"] == 3
        store.close()
    finally:
        cluster.stop()


def test_tls_options_are_checked_before_connecting(tmp_path):
    with pytest.raises(ConfigError, match="need a TLS url"):
        open_store("redis://127.0.0.1:1/0?ssl_ca_certs=/etc/hostname")
    with pytest.raises(ConfigError, match="does not exist"):
        open_store(f"rediss://127.0.0.1:1/0?ssl_ca_certs={tmp_path}/missing.pem")
    with pytest.raises(ConfigError, match="ssl_cert_reqs"):
        open_store("rediss://127.0.0.1:1/0?ssl_cert_reqs=maybe")
    with pytest.raises(ConfigError, match="ssl_check_hostname"):
        open_store("rediss://127.0.0.1:1/0?ssl_check_hostname=perhaps")


@pytest.mark.parametrize("url", [
    "redis://tenant:hunter2@127.0.0.1:6379/zero",  # bad database
    "rediss://tenant:hunter2@127.0.0.1:6379/0?nope=1",  # unknown parameter
    "shadowserve://127.0.0.1:7480?token=hunter2&nope=1",
    "redis://tenant:hunter2@127.0.0.1:port/0",  # bad port
])
def test_errors_never_show_the_password_or_token(url):
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_store_ping_masks_the_password(acl_redis):
    url = f"redis://{USER}:{QUOTED}@{acl_redis}"
    out = subprocess.run([sys.executable, "-m", "shadowserve.commands.store", "ping", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok: redis://{USER}:***@") and QUOTED not in out.stdout
    bad = subprocess.run([sys.executable, "-m", "shadowserve.commands.store", "ping", url.replace(QUOTED, "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "refused user 'tenant'" in bad.stderr and "nope" not in bad.stderr

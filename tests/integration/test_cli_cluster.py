"""The `storage` CLI against a real 3-node cluster (the CLI runs in-process via click)."""

from __future__ import annotations

import json

from click.testing import CliRunner, Result

from storage.cli import main
from storage.local import LocalCluster


def storage(cluster: LocalCluster, *args: str, stdin: bytes | None = None) -> Result:
    env = {"RINGSTORE_ENDPOINTS": ",".join(cluster.endpoints)}
    return CliRunner().invoke(main, list(args), input=stdin, env=env, catch_exceptions=False)


def test_cli_put_get_cas_delete_scan_map(shared_cluster: LocalCluster) -> None:
    put = storage(shared_cluster, "put", "cli-key", "hello")
    assert put.exit_code == 0, put.output
    version = put.stdout.strip()
    got = storage(shared_cluster, "get", "cli-key", "-o", "json")
    assert got.exit_code == 0
    assert json.loads(got.stdout) == {"key": "cli-key", "value": "hello", "version": version}
    assert storage(shared_cluster, "get", "cli-key").stdout_bytes == b"hello"

    binary = bytes(range(256))
    assert storage(shared_cluster, "put", "cli-bin", stdin=binary).exit_code == 0
    assert storage(shared_cluster, "get", "cli-bin").stdout_bytes == binary

    stale = storage(shared_cluster, "cas", "cli-key", "x", "--expect", "1.1")
    assert stale.exit_code == 1 and version in stale.stderr
    swapped = storage(shared_cluster, "cas", "cli-key", "world", "--expect", version)
    assert swapped.exit_code == 0, swapped.output
    assert storage(shared_cluster, "get", "cli-key").stdout_bytes == b"world"

    scan = storage(shared_cluster, "scan", "-o", "json")
    assert scan.exit_code == 0
    keys = {json.loads(line)["key"] for line in scan.stdout.splitlines() if line.strip()}
    assert {"cli-key", "cli-bin"} <= keys

    assert storage(shared_cluster, "delete", "cli-key").exit_code == 0
    missing = storage(shared_cluster, "get", "cli-key")
    assert missing.exit_code == 1 and missing.stdout == ""

    shown = storage(shared_cluster, "map", "-o", "json")
    assert shown.exit_code == 0
    assert len(json.loads(shown.stdout)["entries"]) == 16


def test_cli_bad_input_exits_2_and_stores_nothing(shared_cluster: LocalCluster) -> None:
    too_long = "k" * 4097
    cases = [
        ("put", "", "v"),
        ("put", too_long, "v"),
        ("cas", "cli-bad", "v", "--expect", "not-a-version"),
        ("get", "cli-bad", "--consistency", "eventual"),
    ]
    for args in cases:
        result = storage(shared_cluster, *args)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.strip(), args
    big = storage(shared_cluster, "put", "cli-big", stdin=b"v" * (1024 * 1024 + 1))
    assert big.exit_code == 2
    assert storage(shared_cluster, "get", "cli-big").exit_code == 1
    assert storage(shared_cluster, "get", "cli-bad").exit_code == 1

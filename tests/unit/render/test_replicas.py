"""Several extension server addresses: every one an endpoint, dead ones left, filters still fail closed."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.commands.cli import main
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.render.bootstrap import render_bootstrap
from extproc.render.options import BootstrapOptions
from extproc.render.wire import AUTHZ_HTTP_CLUSTER, EXTPROC_CLUSTER
from tests.messages import SERVER_DOC

PIPELINE = Registry().build_pipeline(DEFAULT_PIPELINE)
FAST = PIPELINE.fast_call_eras
TWO = BootstrapOptions(
    extproc_tcp="10.0.0.1:50051",
    extproc_replicas=("10.0.0.2:50051",),
    fast_calls=FAST,
    authz_http_unix="/run/a.sock",
    authz_http_replicas=("/run/b.sock",),
)


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def http_filters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    found = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
    return {f["name"]: f["typed_config"] for f in found}


def addresses(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    [group] = cluster["load_assignment"]["endpoints"]
    return [e["endpoint"]["address"] for e in group["lb_endpoints"]]


def test_every_address_is_an_endpoint_of_one_cluster(catalog: Catalog) -> None:
    found = clusters(render_bootstrap(catalog, PIPELINE.needs, TWO))
    assert addresses(found[EXTPROC_CLUSTER]) == [
        {"socket_address": {"address": "10.0.0.1", "port_value": 50051}},
        {"socket_address": {"address": "10.0.0.2", "port_value": 50051}},
    ]
    assert addresses(found[AUTHZ_HTTP_CLUSTER]) == [
        {"pipe": {"path": "/run/a.sock"}},
        {"pipe": {"path": "/run/b.sock"}},
    ]


def test_a_dead_replica_is_health_checked_and_ejected_quickly(catalog: Catalog) -> None:
    found = clusters(render_bootstrap(catalog, PIPELINE.needs, TWO))
    grpc, http = found[EXTPROC_CLUSTER], found[AUTHZ_HTTP_CLUSTER]
    [grpc_check] = grpc["health_checks"]
    assert "grpc_health_check" in grpc_check  # a stopping replica answers NOT_SERVING
    [http_check] = http["health_checks"]
    assert "tcp_health_check" in http_check
    for check in (grpc_check, http_check):
        assert check["interval"] == check["no_traffic_interval"] == "1s"
        assert check["unhealthy_threshold"] == check["healthy_threshold"] == 1
    for cluster in (grpc, http):
        assert cluster["connect_timeout"] == "1s"
        outliers = cluster["outlier_detection"]
        assert outliers["split_external_local_origin_errors"] is True
        assert outliers["consecutive_local_origin_failure"] == 1
        assert outliers["max_ejection_percent"] == 50  # never every replica at once
    options = grpc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]["interval"] == "10s"


def test_a_call_that_found_a_dead_replica_is_retried_on_another_and_still_fails_closed(catalog: Catalog) -> None:
    filters = http_filters(render_bootstrap(catalog, PIPELINE.needs, TWO))
    ext_proc = filters["envoy.filters.http.ext_proc"]
    authz = filters["envoy.filters.http.ext_authz"]
    for config, policy in (
        (ext_proc, ext_proc["grpc_service"]["retry_policy"]),
        (authz, authz["http_service"]["retry_policy"]),
    ):
        assert config.get("failure_mode_allow", False) is False
        assert "connect-failure" in policy["retry_on"] and "5xx" not in policy["retry_on"]
        assert policy["num_retries"] == 1
        assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    over_grpc = dataclasses.replace(TWO, authz_http_unix=None, authz_http_replicas=())  # the gRPC Check
    grpc_authz = http_filters(render_bootstrap(catalog, PIPELINE.needs, over_grpc))["envoy.filters.http.ext_authz"]
    assert grpc_authz.get("failure_mode_allow", False) is False
    assert "connect-failure" in grpc_authz["grpc_service"]["retry_policy"]["retry_on"]


def test_one_address_renders_exactly_as_before(catalog: Catalog) -> None:
    one = BootstrapOptions(extproc_unix="/run/x.sock", fast_calls=FAST, authz_http_unix="/run/a.sock")
    config = render_bootstrap(catalog, PIPELINE.needs, one)
    for cluster in clusters(config).values():
        assert "health_checks" not in cluster and "outlier_detection" not in cluster
    assert addresses(clusters(config)[EXTPROC_CLUSTER]) == [{"pipe": {"path": "/run/x.sock"}}]
    filters = http_filters(config)
    assert "retry_policy" not in filters["envoy.filters.http.ext_proc"]["grpc_service"]
    assert "retry_policy" not in filters["envoy.filters.http.ext_authz"]["http_service"]


def test_unix_replicas_and_a_repeated_address(catalog: Catalog) -> None:
    unix = BootstrapOptions(extproc_unix="/run/1.sock", extproc_replicas=("unix:/run/2.sock", "127.0.0.1:7"))
    assert addresses(clusters(render_bootstrap(catalog, PIPELINE.needs, unix))[EXTPROC_CLUSTER]) == [
        {"pipe": {"path": "/run/1.sock"}},
        {"pipe": {"path": "/run/2.sock"}},
        {"socket_address": {"address": "127.0.0.1", "port_value": 7}},
    ]
    with pytest.raises(ConfigError, match="name one twice"):
        render_bootstrap(catalog, PIPELINE.needs, BootstrapOptions(extproc_replicas=("127.0.0.1:50051",)))
    with pytest.raises(ConfigError, match="expected host:port"):
        render_bootstrap(catalog, PIPELINE.needs, BootstrapOptions(extproc_replicas=("nowhere",)))


def test_the_listener_can_refuse_to_share_its_port(catalog: Catalog) -> None:
    shared = render_bootstrap(catalog, PIPELINE.needs, BootstrapOptions())
    assert "enable_reuse_port" not in shared["static_resources"]["listeners"][0]  # Envoy's default: reuse
    alone = render_bootstrap(catalog, PIPELINE.needs, BootstrapOptions(listen_reuse_port=False))
    assert alone["static_resources"]["listeners"][0]["enable_reuse_port"] is False


def _resources(tmp_path: Path) -> Path:
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump(SERVER_DOC))
    return path


def test_render_envoy_takes_grpc_and_authz_http_once_per_replica(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["render", "envoy", "-f", str(_resources(tmp_path)), "--grpc", "127.0.0.1:1", "--grpc", "127.0.0.1:2"]
    assert main([*argv, "--authz-http", "/run/a.sock", "--authz-http", "/run/b.sock"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    found = clusters(config)
    assert [a["socket_address"]["port_value"] for a in addresses(found[EXTPROC_CLUSTER])] == [1, 2]
    assert [a["pipe"]["path"] for a in addresses(found[AUTHZ_HTTP_CLUSTER])] == ["/run/a.sock", "/run/b.sock"]
    assert main(["render", "envoy", "-f", str(_resources(tmp_path))]) == 0  # the default: one address
    default = clusters(yaml.safe_load(capsys.readouterr().out))[EXTPROC_CLUSTER]
    assert addresses(default) == [{"socket_address": {"address": "127.0.0.1", "port_value": 50051}}]


@pytest.mark.parametrize("flag", ["--grpc", "--authz-http"])
def test_serve_listens_on_one_address_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "-f", str(_resources(tmp_path)), flag, "127.0.0.1:1", flag, "127.0.0.1:2"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} given twice: serve listens on one address" in err
    assert "Traceback" not in err

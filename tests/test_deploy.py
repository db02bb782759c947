"""The deployment files under deploy/, checked without a container engine.

What can be checked here is checked: every YAML file parses, the Kubernetes manifests
validate against the Kubernetes 1.30 schemas (strict: no unknown fields), only the
callback routes are public in the compose file, the nginx config and the Ingress, the
Dockerfile and the systemd unit run ``bulkhook serve`` as an unprivileged user, and every
bulkhook setting named anywhere under deploy/ is one the service knows (.env.example).
"""

from __future__ import annotations

import configparser
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.api.guard import ServedHosts
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"

CALLBACK_PATHS = [
    "/callbacks",
    "/callbacks/instances/crm",
    "/callbacks/jobs/01HZX3K9Q2",
    "/callbacks/jobs/1234",
]
NOT_PUBLIC_PATHS = [
    "/",
    "/jobs",
    "/jobs/01HZX3K9Q2",
    "/jobs/01HZX3K9Q2/errors",
    "/jobs/01HZX3K9Q2/cancel",
    "/objects",
    "/metrics",
    "/openapi.json",
    "/sandbox",
    "/sandbox/elements/api-v2/hubs/marketing/objects",
    "/healthz",
    "/readyz",
    "/callbacks/",
    "/callbacksx",
    "/callbacks/jobs",
    "/callbacks/jobs/",
    "/callbacks/jobs/01HZX3K9Q2/extra",
    "/callbacks/instances",
    "/callbacks/instances/",
    "/callbacks/instances/crm/extra",
    "/CALLBACKS",
]

# Variables set in deploy files that bulkhook itself does not read (so they are not in
# .env.example): each is read by the program named here.
FOREIGN_VARIABLES = {
    "FORWARDED_ALLOW_IPS": "uvicorn (trusted proxies for X-Forwarded-*)",
    "PYTHONDONTWRITEBYTECODE": "python",
    "PYTHONUNBUFFERED": "python",
    "PIP_NO_CACHE_DIR": "pip",
    "PIP_DISABLE_PIP_VERSION_CHECK": "pip",
}


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml"))


def _docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every Kubernetes object under deploy/kubernetes/ (not the kustomize file)."""
    found = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") != "Kustomization":
                found.append((path.name, doc))
    return found


def _manifest(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in _manifests() if doc["kind"] == kind]
    return doc


def _known_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))
    assert "BULKHOOK_DATABASE_URL" in names, "could not read the variables of .env.example"
    return names


def _seconds(value: str | int) -> int:
    if isinstance(value, int):
        return value
    parts = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", value.strip())
    assert parts and value.strip(), f"not a duration: {value!r}"
    return int(parts[1] or 0) * 60 + int(parts[2] or 0)


# --- YAML and Kubernetes -----------------------------------------------------------


def test_the_deploy_folder_has_every_piece() -> None:
    for name in [
        "Dockerfile",
        "docker-compose.yml",
        "bulkhook.env.example",
        "nginx.conf",
        "bulkhook.service",
        "README.md",
        "kubernetes/deployment.yaml",
        "kubernetes/service.yaml",
        "kubernetes/ingress.yaml",
        "kubernetes/secret.example.yaml",
        "kubernetes/configmap.yaml",
        "kubernetes/pdb.yaml",
        "kubernetes/results-pvc.yaml",
    ]:
        assert (DEPLOY / name).is_file(), name


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


@pytest.mark.parametrize(
    ("name", "doc"), _manifests(), ids=[f"{n}:{d['kind']}" for n, d in _manifests()]
)
def test_kubernetes_manifests_are_valid_for_1_30(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, "1.30", strict=True)


def test_every_kind_is_there_once() -> None:
    kinds = sorted(doc["kind"] for _, doc in _manifests())
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "Ingress",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )


def test_kustomization_applies_everything_but_the_example_secret() -> None:
    (kustomization,) = _docs(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"])
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests - {"secret.example.yaml"}


def test_deployment_is_replicated_probed_and_unprivileged() -> None:
    deployment = _manifest("Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    assert container["command"] + container["args"][:1] == ["bulkhook", "serve"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    assert container["args"][-2:] == ["--port", "8000"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}

    resources = container["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]

    # uvicorn drains for up to 30 s after SIGTERM; the preStop sleep comes first.
    assert pod["terminationGracePeriodSeconds"] >= 40
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + 30 + 5

    sources = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert sources == {
        "configMapRef": _manifest("ConfigMap")["metadata"]["name"],
        "secretRef": _manifest("Secret")["metadata"]["name"],
    }


def test_service_and_pdb_select_the_deployments_pods() -> None:
    labels = _manifest("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = _manifest("Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    pdb = _manifest("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_ingress_exposes_only_the_callback_routes_over_tls() -> None:
    ingress = _manifest("Ingress")
    service = _manifest("Service")
    port_names = {p["name"] for p in service["spec"]["ports"]}
    routes = set()
    hosts = set()
    for rule in ingress["spec"]["rules"]:
        hosts.add(rule["host"])
        for path in rule["http"]["paths"]:
            routes.add((path["path"], path["pathType"]))
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in port_names
    assert routes == {
        ("/callbacks", "Exact"),
        ("/callbacks/instances/", "Prefix"),
        ("/callbacks/jobs/", "Prefix"),
    }
    assert "defaultBackend" not in ingress["spec"]
    tls_hosts = {h for entry in ingress["spec"]["tls"] for h in entry["hosts"]}
    assert hosts <= tls_hosts
    assert all(entry["secretName"] for entry in ingress["spec"]["tls"])


def test_the_example_secret_holds_placeholders_only() -> None:
    secret = _manifest("Secret")
    data = secret["stringData"]
    assert "data" not in secret
    assert {
        "OC_SIGNATURE_KEYS",
        "OC_USER_SECRET",
        "OC_ORG_SECRET",
        "OC_ELEMENT_TOKEN",
        "BULKHOOK_API_TOKENS",
        "BULKHOOK_DATABASE_URL",
    } == data.keys()
    assert all("REPLACE_ME" in value for value in data.values())
    assert data["BULKHOOK_DATABASE_URL"].startswith("postgresql://")


def test_the_configmap_holds_no_secret() -> None:
    data = _manifest("ConfigMap")["data"]
    assert not data.keys() & _manifest("Secret")["stringData"].keys()
    assert data["BULKHOOK_PUBLIC_URL"].startswith("https://")
    assert all(isinstance(value, str) for value in data.values())


# --- docker compose ----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    (compose,) = _docs(DEPLOY / "docker-compose.yml")
    return compose


def _published(port: str | dict[str, Any]) -> tuple[str | None, int, int]:
    """(host address or None for all, published port, container port)."""
    if isinstance(port, dict):
        return port.get("host_ip"), int(port["published"]), int(port["target"])
    parts = str(port).split(":")
    assert len(parts) in (2, 3), f"give both sides of a port mapping: {port!r}"
    host = parts[0] if len(parts) == 3 else None
    return host, int(parts[-2]), int(parts[-1])


def _public_container_ports() -> set[int]:
    ports = _compose()["services"]["nginx"]["ports"]
    return {target for host, _, target in map(_published, ports) if host != "127.0.0.1"}


def test_compose_runs_two_replicas_postgres_and_nginx() -> None:
    services = _compose()["services"]
    assert set(services) == {"bulkhook-1", "bulkhook-2", "postgres", "nginx"}
    one, two = services["bulkhook-1"], services["bulkhook-2"]
    assert one == two, "the replicas must run the same image with the same settings"
    assert one["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / one["build"]["context"] / "pyproject.toml").is_file()
    assert one["env_file"] == ["bulkhook.env"]
    assert (DEPLOY / "bulkhook.env.example").is_file()
    url = one["environment"]["BULKHOOK_DATABASE_URL"]
    assert re.fullmatch(
        r"postgresql://bulkhook:\$\{POSTGRES_PASSWORD[^}]*\}@postgres:5432/\w+", url
    )
    assert one["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert _seconds(one["stop_grace_period"]) >= 40
    assert one["read_only"] is True

    postgres = services["postgres"]
    assert postgres["image"] == "postgres:15"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert postgres["volumes"][0].split(":")[0] in _compose()["volumes"]


def test_only_the_proxy_publishes_ports_and_only_80_and_443_publicly() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if name != "nginx":
            assert "ports" not in service, f"{name} must not publish a port"
            assert service.get("network_mode") != "host", name
    mappings = [_published(p) for p in services["nginx"]["ports"]]
    public = {(published, target) for host, published, target in mappings if host != "127.0.0.1"}
    assert public == {(80, 80), (443, 443)}
    internal = [target for host, _, target in mappings if host == "127.0.0.1"]
    assert internal, "the job API needs an internal listener on the host's loopback"


def test_postgres_is_on_an_internal_network_only() -> None:
    compose = _compose()
    networks = compose["networks"]
    (network,) = compose["services"]["postgres"]["networks"]
    assert networks[network]["internal"] is True
    assert network not in compose["services"]["nginx"]["networks"]


def test_the_env_file_example_holds_placeholders_not_secrets() -> None:
    values = _env_assignments((DEPLOY / "bulkhook.env.example").read_text(encoding="utf-8"))
    for name in ("OC_USER_SECRET", "OC_ORG_SECRET", "OC_ELEMENT_TOKEN", "OC_SIGNATURE_KEYS"):
        assert values[name] == "REPLACE_ME", name
    assert values["BULKHOOK_API_TOKENS"] == "REPLACE_ME"
    assert values["BULKHOOK_PUBLIC_URL"].startswith("https://")
    ignored = (DEPLOY / ".gitignore").read_text(encoding="utf-8").split()
    assert {"bulkhook.env", ".env", "certs/"} <= set(ignored)


def _env_assignments(text: str, commented: bool = False) -> dict[str, str]:
    prefix = r"#?\s*" if commented else ""
    pattern = rf"^{prefix}([A-Za-z_][A-Za-z0-9_]*)=(.*)$"
    return {m[1]: m[2] for m in re.finditer(pattern, text, flags=re.MULTILINE)}


# --- nginx ---------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def walk(self) -> Iterator[Directive]:
        for child in self.block or []:
            yield child
            yield from child.walk()


@dataclass
class Server:
    ports: set[int]
    directive: Directive
    locations: list[Directive] = field(default_factory=list)


_NGINX_TOKEN = re.compile(r"#[^\n]*|\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|[{};]|[^\s{};\"'#]+")


def parse_nginx(text: str) -> Directive:
    """nginx's configuration grammar: words, `;` ends a directive, `{ }` a block."""
    root = Directive("main", [], [])
    stack = [root]
    words: list[str] = []
    for token in _NGINX_TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if token in (";", "{"):
            assert words, f"a {token!r} without a directive"
            directive = Directive(words[0], words[1:], [] if token == "{" else None)
            assert stack[-1].block is not None
            stack[-1].block.append(directive)
            if token == "{":
                stack.append(directive)
            words = []
        elif token == "}":
            assert not words, f"unterminated directive {words}"
            stack.pop()
            assert stack, "unbalanced }"
        else:
            words.append(token[1:-1] if token[0] in "\"'" else token)
    assert len(stack) == 1 and not words, "unbalanced braces or a directive without ;"
    return root


def _nginx_servers() -> list[Server]:
    root = parse_nginx((DEPLOY / "nginx.conf").read_text(encoding="utf-8"))
    (http,) = root.find("http")
    servers = []
    for server in http.find("server"):
        ports = {int(listen.args[0].rsplit(":", 1)[-1]) for listen in server.find("listen")}
        servers.append(Server(ports, server, server.find("location")))
    return servers


def _match_location(locations: list[Directive], path: str) -> Directive | None:
    """The location nginx picks for a (normalised) path: an exact match; else the
    longest prefix if it is ``^~``; else the first matching regex; else that prefix."""
    for location in locations:
        if location.args[0] == "=" and location.args[1] == path:
            return location
    prefixes = [loc for loc in locations if len(loc.args) == 1 or loc.args[0] == "^~"]
    matching = [loc for loc in prefixes if path.startswith(loc.args[-1])]
    longest = max(matching, key=lambda loc: len(loc.args[-1]), default=None)
    if longest is not None and longest.args[0] == "^~":
        return longest
    for location in locations:
        if location.args[0] in ("~", "~*"):
            flags = re.IGNORECASE if location.args[0] == "~*" else 0
            if re.search(location.args[1], path, flags):
                return location
    return longest


def _proxied(location: Directive) -> bool:
    return any(d.name == "proxy_pass" for d in location.walk())


def _returns(location: Directive) -> list[str] | None:
    (ret,) = location.find("return") or [None]
    return ret.args if ret else None


def test_nginx_config_parses_and_has_public_and_internal_servers() -> None:
    servers = _nginx_servers()
    public_ports = _public_container_ports()
    public = [s for s in servers if s.ports & public_ports]
    assert {port for s in public for port in s.ports} == {80, 443}
    assert all(s.ports <= public_ports for s in public), "a server mixes public and private"
    internal = [s for s in servers if not s.ports & public_ports]
    (internal_server,) = internal
    loopback_only = {
        target
        for host, _, target in map(_published, _compose()["services"]["nginx"]["ports"])
        if host == "127.0.0.1"
    }
    assert internal_server.ports <= loopback_only


def test_nginx_public_servers_have_only_the_callback_locations() -> None:
    public_ports = _public_container_ports()
    for server in (s for s in _nginx_servers() if s.ports & public_ports):
        callbacks = {
            ("=", "/callbacks"),
            ("~", "^/callbacks/instances/[^/]+$"),
            ("~", "^/callbacks/jobs/[^/]+$"),
        }
        present = [tuple(loc.args) for loc in server.locations]
        assert callbacks <= set(present), f"server on {server.ports}: a callback route is missing"
        assert len(present) == len(set(present)), "a location is given twice"
        other = [loc for loc in server.locations if tuple(loc.args) not in callbacks]
        for location in other:
            assert _returns(location) == ["404"], f"{location.args} must return 404"
            assert not _proxied(location)
        (body_size,) = server.directive.find("client_max_body_size")
        assert body_size.args == ["1m"]
        for location in server.locations:
            if tuple(location.args) not in callbacks:
                continue
            if 443 in server.ports:
                assert _proxied(location)
                (limit,) = location.find("limit_except")
                assert limit.args == ["POST"]
                assert [(d.name, d.args) for d in limit.block or []] == [("deny", ["all"])]
            else:
                returned = _returns(location)
                assert returned is not None and returned[0] == "308"
                assert returned[1].startswith("https://")


@pytest.mark.parametrize("path", CALLBACK_PATHS + NOT_PUBLIC_PATHS)
def test_nginx_routes_only_callback_paths_to_the_service_publicly(path: str) -> None:
    (tls,) = [s for s in _nginx_servers() if 443 in s.ports]
    location = _match_location(tls.locations, path)
    assert location is not None, f"no location for {path}"
    if path in CALLBACK_PATHS:
        assert _proxied(location), path
    else:
        assert not _proxied(location), f"{path} must not reach the service publicly"
        assert _returns(location) == ["404"], path


def test_nginx_tls_and_upstreams() -> None:
    (tls,) = [s for s in _nginx_servers() if 443 in s.ports]
    (listen,) = tls.directive.find("listen")
    assert "ssl" in listen.args
    assert tls.directive.find("ssl_certificate")[0].args[0].startswith("/etc/nginx/certs/")
    assert tls.directive.find("ssl_certificate_key")[0].args[0].startswith("/etc/nginx/certs/")
    root = parse_nginx((DEPLOY / "nginx.conf").read_text(encoding="utf-8"))
    (http,) = root.find("http")
    (upstream,) = http.find("upstream")
    targets = {server.args[0] for server in upstream.find("server")}
    replicas = {name for name in _compose()["services"] if name.startswith("bulkhook-")}
    assert targets == {f"{name}:8000" for name in replicas}
    passes = {d.args[0] for d in http.walk() if d.name == "proxy_pass"}
    assert passes == {f"http://{upstream.args[0]}"}
    volumes = _compose()["services"]["nginx"]["volumes"]
    assert "./nginx.conf:/etc/nginx/nginx.conf:ro" in volumes
    assert "./certs:/etc/nginx/certs:ro" in volumes


def test_the_internal_listener_takes_large_streamed_uploads() -> None:
    public_ports = _public_container_ports()
    (internal,) = [s for s in _nginx_servers() if not s.ports & public_ports]
    (body_size,) = internal.directive.find("client_max_body_size")
    assert body_size.args == ["2g"]
    assert internal.directive.find("proxy_request_buffering")[0].args == ["off"]


def test_the_internal_listener_streams_results_without_spooling_them() -> None:
    # A result of several GB would otherwise fill nginx's temporary files first.
    public_ports = _public_container_ports()
    (internal,) = [s for s in _nginx_servers() if not s.ports & public_ports]
    buffering = [d.args for d in internal.directive.walk() if d.name == "proxy_buffering"]
    assert buffering == [["off"]]


# --- Dockerfile ------------------------------------------------------------------------


def _dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (DEPLOY / name).read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        keyword, _, rest = whole.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends in a continuation line"
    return instructions


def _instruction(keyword: str) -> list[str]:
    return [rest for key, rest in _dockerfile() if key == keyword]


def test_dockerfile_base_user_port_and_install() -> None:
    assert _instruction("FROM") == ["python:3.11-slim"]
    (user,) = _instruction("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert _instruction("EXPOSE") == ["8000"]
    installs = [run for run in _instruction("RUN") if "pip install" in run]
    assert installs and all("--no-cache-dir" in run for run in installs)
    keys = [k for key, rest in _dockerfile() if key == "ENV" for k in _env_keys(rest)]
    assert "FORWARDED_ALLOW_IPS" in keys
    # USER comes after everything that needs root.
    keywords = [key for key, _ in _dockerfile()]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN")


def test_dockerfile_runs_bulkhook_serve_on_8000() -> None:
    (entrypoint,) = _instruction("ENTRYPOINT")
    (cmd,) = _instruction("CMD")
    command = json.loads(entrypoint) + json.loads(cmd)
    all_interfaces = "0.0.0.0"  # noqa: S104 - inside the container, behind the proxy
    assert command == ["bulkhook", "serve", "--host", all_interfaces, "--port", "8000"]


def test_dockerfile_healthcheck_hits_healthz_with_urllib() -> None:
    (healthcheck,) = _instruction("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    assert "urllib" in argv[2] and "http://127.0.0.1:8000/healthz" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    rules = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").split("\n")
    rules = [r.strip() for r in rules if r.strip() and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for copy in _instruction("COPY"):
        *sources, _ = shlex.split(copy)
        assert all(not s.startswith("--") for s in sources)
        assert set(sources) <= allowed, sources


def _env_keys(rest: str) -> list[str]:
    return [word.split("=", 1)[0] for word in shlex.split(rest)]


def _env_pairs(rest: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (word.partition("=") for word in shlex.split(rest))]


# --- systemd -----------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "bulkhook.service").read_text(encoding="utf-8"))
    return parser


def test_systemd_unit_runs_bulkhook_serve_as_a_dedicated_user() -> None:
    unit = _unit()
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "bulkhook" and Path(argv[0]).is_absolute()
    assert argv[1] == "serve"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert service["User"] not in ("root", "0")
    assert service["EnvironmentFile"] == "/etc/bulkhook/bulkhook.env"
    assert service["WorkingDirectory"] == "/var/lib/bulkhook"
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) >= 40
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_unit_is_hardened() -> None:
    service = _unit()["Service"]
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert "/var/lib/bulkhook" in service["ReadWritePaths"].split()
    assert service["PrivateTmp"] == "yes"
    assert service["ProtectHome"] == "yes"
    assert service["CapabilityBoundingSet"] == ""


# --- Settings ----------------------------------------------------------------------


def _deploy_text_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_every_bulkhook_variable_named_under_deploy_exists() -> None:
    known = _known_variables()
    for path in _deploy_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for name in re.findall(r"\b(?:BULKHOOK|OC)_[A-Z0-9_]+\b", text):
            assert name in known, f"{path.relative_to(ROOT)} names {name}, not in .env.example"


def _defined_variables() -> dict[str, set[str]]:
    """Every variable a deploy file hands to a process, by the file that sets it."""
    compose = _compose()["services"]
    env_example = (DEPLOY / "bulkhook.env.example").read_text(encoding="utf-8")
    unit = _unit()["Service"]
    unit_env = [shlex.split(v) for k, v in unit.items() if k == "Environment"]
    return {
        "bulkhook.env.example": set(_env_assignments(env_example, commented=True)),
        "docker-compose.yml": {
            name for svc in ("bulkhook-1", "bulkhook-2") for name in compose[svc]["environment"]
        },
        "kubernetes/configmap.yaml": set(_manifest("ConfigMap")["data"]),
        "kubernetes/secret.example.yaml": set(_manifest("Secret")["stringData"]),
        "kubernetes/deployment.yaml": {v["name"] for v in _container().get("env", [])},
        "Dockerfile": {k for rest in _instruction("ENV") for k in _env_keys(rest)},
        "bulkhook.service": {w.split("=", 1)[0] for words in unit_env for w in words},
    }


def test_every_variable_set_by_a_deploy_file_is_read_by_something() -> None:
    known = _known_variables() | FOREIGN_VARIABLES.keys()
    for source, names in _defined_variables().items():
        assert names <= known, f"{source}: unknown variables {sorted(names - known)}"


def test_the_secret_and_env_file_carry_what_a_deployment_needs() -> None:
    needed = {"OC_SIGNATURE_KEYS", "BULKHOOK_API_TOKENS", "BULKHOOK_PUBLIC_URL", "OC_BASE_URL"}
    defined = _defined_variables()
    assert needed <= defined["bulkhook.env.example"]
    kubernetes = defined["kubernetes/configmap.yaml"] | defined["kubernetes/secret.example.yaml"]
    assert needed | {"BULKHOOK_DATABASE_URL"} <= kubernetes


# --- Download results: one directory every replica shares --------------------------

RESULTS_VARIABLE = "BULKHOOK_RESULTS_DIR"


def _container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = _manifest("Deployment")["spec"]["template"]["spec"][
        "containers"
    ]
    (container,) = containers
    return container


def _gibibytes(quantity: str) -> float:
    """A Kubernetes storage quantity (binary or decimal suffix) in GiB."""
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGTP]i?)?", quantity).groups()  # type: ignore[union-attr]
    scale = {
        None: 1,
        "K": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
    }[unit]
    return float(number) * scale / 2**30


def test_compose_replicas_mount_one_named_volume_where_the_results_dir_points() -> None:
    compose = _compose()
    replicas = {n: s for n, s in compose["services"].items() if n.startswith("bulkhook-")}
    assert len(replicas) >= 2
    shared = set()
    for name, service in replicas.items():
        results_dir = service["environment"][RESULTS_VARIABLE]
        assert results_dir.startswith("/"), name
        mounted = [v for v in service["volumes"] if v["target"] == results_dir]
        assert len(mounted) == 1, f"{name}: nothing mounted at {results_dir}"
        (volume,) = mounted
        # A named volume: an anonymous one would be each container's own.
        assert volume["type"] == "volume" and volume.get("source"), name
        assert not volume.get("read_only"), name
        assert not volume.get("volume", {}).get("nocopy"), name
        shared.add((volume["source"], results_dir))
    assert len(shared) == 1, f"the replicas mount different results volumes: {shared}"
    ((source, results_dir),) = shared
    assert source in compose["volumes"]
    # Uploads spool to /tmp, each replica's own volume; results are not put there.
    assert not Path(results_dir).is_relative_to("/tmp")


def test_the_image_owns_the_results_dir_so_a_new_volume_starts_owner_only() -> None:
    results_dir = _compose()["services"]["bulkhook-1"]["environment"][RESULTS_VARIABLE]
    env = {k: v for rest in _instruction("ENV") for k, v in _env_pairs(rest)}
    assert env[RESULTS_VARIABLE] == results_dir
    uid = _instruction("USER")[0].split(":")[0]
    (useradd,) = [
        words
        for run in _instruction("RUN")
        for command in run.split("&&")
        if (words := shlex.split(command))[:1] == ["useradd"]
    ]
    assert useradd[useradd.index("--uid") + 1] == uid
    made = [
        words
        for run in _instruction("RUN")
        for command in run.split("&&")
        if (words := shlex.split(command))[:2] == ["install", "-d"] and results_dir in words
    ]
    assert made, f"the image does not make {results_dir}"
    (words,) = made
    assert words[words.index("-m") + 1] == "0700"
    # The user the image runs as, by name (useradd's last word) or by uid.
    assert words[words.index("-o") + 1] in (useradd[-1], uid)


def test_kubernetes_replicas_mount_a_read_write_many_claim_where_the_results_dir_points() -> None:
    deployment = _manifest("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _container()
    assert deployment["spec"]["replicas"] >= 2
    env = {v["name"]: v.get("value") for v in container.get("env", [])}
    results_dir = env[RESULTS_VARIABLE]
    assert results_dir and results_dir.startswith("/")
    # Set once: the ConfigMap or the Secret naming another directory would be confusing.
    assert RESULTS_VARIABLE not in _manifest("ConfigMap")["data"]
    assert RESULTS_VARIABLE not in _manifest("Secret")["stringData"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == results_dir]
    assert not mount.get("readOnly") and not mount.get("subPath")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = _manifest("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert not volume["persistentVolumeClaim"].get("readOnly")
    # Pods on different nodes write and read it at once.
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"].get("storageClassName"), "name a class that supports ReadWriteMany"
    assert claim["spec"].get("volumeMode", "Filesystem") == "Filesystem"
    # Room for more than one result of the largest size (about 6 GB).
    assert _gibibytes(claim["spec"]["resources"]["requests"]["storage"]) >= 2 * 6


def test_the_results_volume_is_not_walked_at_every_pod_start() -> None:
    security = _manifest("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert security["fsGroupChangePolicy"] == "OnRootMismatch"


def test_the_systemd_unit_may_write_the_results_dir_the_env_file_suggests() -> None:
    env_file = (DEPLOY / "bulkhook.env.example").read_text(encoding="utf-8")
    suggested = Path(_env_assignments(env_file, commented=True)[RESULTS_VARIABLE])
    writable = [Path(p) for p in _unit()["Service"]["ReadWritePaths"].split()]
    assert any(suggested.is_relative_to(path) for path in writable), suggested
    # The default (./bulkhook-results) is relative to the working directory: writable too.
    working = Path(_unit()["Service"]["WorkingDirectory"])
    assert any(working.is_relative_to(path) for path in writable)


# --- The Host check ------------------------------------------------------------------


def _served(bind: str, env: dict[str, str]) -> ServedHosts:
    """What a deployment's service answers for: its bind address and its host settings
    (only those: the examples' placeholders are not settings a service would start with)."""
    wanted = {
        k: v for k, v in env.items() if k in ("BULKHOOK_PUBLIC_URL", "BULKHOOK_ALLOWED_HOSTS")
    }
    return ServedHosts(Settings.from_env(wanted, env_file=None).replace(bind_host=bind))


def test_every_deployment_serves_the_hosts_its_clients_use_and_no_other() -> None:
    (container,) = _manifest("Deployment")["spec"]["template"]["spec"]["containers"]
    kubernetes = _served(
        container["args"][container["args"].index("--host") + 1], _manifest("ConfigMap")["data"]
    )
    # In-cluster clients by the Service's names, kubectl port-forward, Prometheus by pod IP.
    for host in [
        "bulkhook",
        "bulkhook.bulkhook.svc",
        "bulkhook.bulkhook.svc.cluster.local:80",
        "localhost:8080",
        "10.244.3.17:8000",
        "bulkhook.example.com",
    ]:
        assert kubernetes.serves(host), host

    env_file = _env_assignments((DEPLOY / "bulkhook.env.example").read_text(encoding="utf-8"))
    (cmd,) = _instruction("CMD")
    compose = _served(json.loads(cmd)[json.loads(cmd).index("--host") + 1], env_file)
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    systemd = _served(argv[argv.index("--host") + 1], env_file)
    # The internal listener on the host's loopback (nginx passes the client's Host), and
    # the image's own health check.
    for served in (compose, systemd):
        for host in ["127.0.0.1:8080", "localhost:8080", "127.0.0.1:8000"]:
            assert served.serves(host), host

    for served in (kubernetes, compose, systemd):
        assert not served.serves("evil.example")
        assert not served.serves("bulkhook.example.com.evil.example")


def test_nginx_passes_the_clients_host_with_its_port() -> None:
    root = parse_nginx((DEPLOY / "nginx.conf").read_text(encoding="utf-8"))
    (http,) = root.find("http")
    hosts = [d.args for d in http.walk() if d.name == "proxy_set_header" and d.args[0] == "Host"]
    assert hosts == [["Host", "$client_host"]]  # once, at the http level, so every server has it
    (mapped,) = [d for d in http.find("map") if d.args == ["$http_host", "$client_host"]]
    # The Host as sent; nginx's own host only when the request carried none.
    assert {d.name: d.args for d in mapped.block or []} == {
        "": ["$host"],
        "default": ["$http_host"],
    }

"""Static checks of the compose stack: docker-compose.yml, Dockerfile, .dockerignore.

No container engine is needed, nor used. The compose file is read as YAML,
interpolated the way compose does it with nothing set in the environment, and
everything in it is checked against the project itself: each command a service
runs is parsed by the project's own parser (or the program's), each
``ORCHESTRATOR_*`` variable must be a field of the settings, each service it
names must exist. A mistake here would otherwise only show when the stack runs.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import re
import shlex
import tomllib
import warnings
from collections.abc import Iterator
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

from events.config import EventSettings
from orchestrator.cli import build_parser, load_app
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DEFINITIONS = ROOT / "docker" / "rabbitmq" / "definitions.json"
DOCS = ROOT / "docs" / "compose.md"

# The services that run someone else's image, and which one.
INFRASTRUCTURE = {"postgres": "postgres:15", "rabbitmq": "rabbitmq:3-management"}
PROJECT_BUILD = {"context": ".", "dockerfile": "Dockerfile"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Read by the integration suite (tests/integration/harness.py), not by Settings.
TEST_VARIABLES = {"ORCHESTRATOR_TEST_DATABASE_URL", "ORCHESTRATOR_TEST_BROKER_URL"}
# orchestrator subcommands that are long-running and may run in several copies.
SCALABLE_COMMANDS = {"worker", "relay", "scheduler"}
# orchestrator subcommands that load the application (the rest need none).
APP_COMMANDS = {"worker", "relay", "scheduler", "start", "show", "history", "cancel"}

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and $$.
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)
_SHELL_VARIABLE = re.compile(r"\$\{?[A-Za-z_]\w*\}?")
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"]+")


# ------------------------------------------------------------------------ loading
def _interpolate(text: str, seen: dict[str, str]) -> str:
    """Substitute as compose does when nothing is set: each variable's default.

    Every variable must have one (``${VAR:-default}``), so that the stack runs
    without any set-up; ``seen`` collects each variable and its default.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op = match.group("op")
        if op not in {"-", ":-"}:
            raise AssertionError(
                f"{match.group(0)!r} in the compose file has no default; "
                "write ${NAME:-default} so that the stack runs with nothing set"
            )
        seen[name] = match.group("arg")
        return match.group("arg")

    return _VARIABLE.sub(replace, text)


def _walk(node: Any, seen: dict[str, str]) -> Any:
    if isinstance(node, str):
        return _interpolate(node, seen)
    if isinstance(node, list):
        return [_walk(item, seen) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, seen) for key, value in node.items()}
    return node


@cache
def _loaded() -> tuple[dict[str, Any], dict[str, str]]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    seen: dict[str, str] = {}
    return _walk(raw, seen), seen


def compose() -> dict[str, Any]:
    return _loaded()[0]


def host_variables() -> dict[str, str]:
    """Variables the compose file reads from the shell that runs it, with their defaults."""
    return _loaded()[1]


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def project_services() -> dict[str, dict[str, Any]]:
    return {name: spec for name, spec in services().items() if name not in INFRASTRUCTURE}


def environment(spec: dict[str, Any]) -> dict[str, str | None]:
    env = spec.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.partition("=") for item in env)
        return {key: value if sep else None for key, sep, value in pairs}
    return {key: None if value is None else str(value) for key, value in env.items()}


def depends_on(spec: dict[str, Any]) -> dict[str, str]:
    deps = spec.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (value or {}).get("condition", "service_started") for name, value in deps.items()}


@cache
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def image_cmd() -> list[str]:
    cmds = [rest for keyword, rest in dockerfile_instructions() if keyword == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    argv: list[str] = json.loads(cmds[-1])
    return argv


def _simple_commands(shell: str) -> Iterator[list[str]]:
    """The simple commands of a shell line: ``a && b; c | d`` gives a, b, c, d."""
    lexer = shlex.shlex(
        _SHELL_VARIABLE.sub("placeholder", shell), posix=True, punctuation_chars=True
    )
    lexer.whitespace_split = True
    argv: list[str] = []
    for token in lexer:
        if token in {"&&", "||", ";", "|", "&"}:
            if argv:
                yield argv
            argv = []
        else:
            argv.append(token)
    if argv:
        yield argv


def commands(spec: dict[str, Any]) -> Iterator[tuple[str, list[str]]]:
    """(where, argv) of every command a service runs: its command and its healthcheck."""
    assert "entrypoint" not in spec, "entrypoints are not checked; use command"
    # Without a command, a service runs its image's: the project's CMD, or one
    # of the infrastructure images' own, which is not the project's to check.
    command = spec.get("command", image_cmd() if "build" in spec else [])
    if isinstance(command, str):
        yield from (("command", argv) for argv in _simple_commands(command))
    elif command:
        yield "command", [str(arg) for arg in command]
    test = (spec.get("healthcheck") or {}).get("test")
    if isinstance(test, str):
        yield from (("healthcheck", argv) for argv in _simple_commands(test))
    elif test and test[0] == "CMD":
        yield "healthcheck", [str(arg) for arg in test[1:]]
    elif test and test[0] == "CMD-SHELL":
        yield from (("healthcheck", argv) for argv in _simple_commands(test[1]))


def orchestrator_args(spec: dict[str, Any]) -> list[Any]:
    """The parsed arguments of each ``orchestrator`` command the service runs (not --help)."""
    parsed = []
    for where, argv in commands(spec):
        if where == "command" and argv[0] == "orchestrator" and "--help" not in argv:
            try:
                parsed.append(build_parser().parse_args(argv[1:]))
            except SystemExit as exc:
                raise AssertionError(f"does not parse: {shlex.join(argv)}") from exc
    return parsed


def runs(spec: dict[str, Any], *subcommands: str) -> bool:
    return any(args.command in subcommands for args in orchestrator_args(spec))


@cache
def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def _requirement_name(requirement: str) -> str:
    name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_requirement_name(requirement) for requirement in requirements}


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)


# -------------------------------------------------------------------- structure
def test_the_file_parses_as_a_compose_specification_file() -> None:
    document = compose()
    assert "version" not in document, "the Compose Specification has no top-level version"
    unknown = set(document) - {"services", "volumes", "networks", "configs", "secrets", "name"}
    assert {key for key in unknown if not key.startswith("x-")} == set()
    assert services(), "no services"


def test_infrastructure_runs_the_chosen_images() -> None:
    for name, image in INFRASTRUCTURE.items():
        assert services()[name].get("image") == image
        assert "build" not in services()[name]


def test_every_project_service_runs_the_one_image_built_from_the_dockerfile() -> None:
    images = set()
    for name, spec in project_services().items():
        assert spec.get("build") == PROJECT_BUILD, f"{name} does not build the project's image"
        images.add(spec.get("image"))
    assert len(images) == 1, f"project services name several images: {images}"
    assert (ROOT / PROJECT_BUILD["dockerfile"]).is_file()


def test_scalable_services_have_no_fixed_name_and_no_host_port() -> None:
    scalable = [name for name, spec in project_services().items() if runs(spec, *SCALABLE_COMMANDS)]
    assert {"workflow-worker", "activity-worker", "relay", "scheduler"} <= set(scalable)
    for name in scalable:
        spec = services()[name]
        assert "container_name" not in spec, f"{name} could not be scaled"
        # Each copy's Celery node name is celery@<its container's hostname>.
        assert "hostname" not in spec, f"{name}'s copies would share one node name"
        assert "ports" not in spec, f"{name} publishes host ports and could not be scaled"
    fixed = [name for name, spec in services().items() if "container_name" in spec]
    assert fixed == [], "a container_name keeps two copies of the stack apart from running"


def test_every_dependency_exists_with_a_valid_condition() -> None:
    for name, spec in services().items():
        for target, condition in depends_on(spec).items():
            assert target in services(), f"{name} depends on {target}, which does not exist"
            assert condition in CONDITIONS, f"{name} -> {target}: unknown condition {condition}"
            target_spec = services()[target]
            if condition == "service_healthy":
                assert "healthcheck" in target_spec, f"{name} waits for {target}'s health"
            if condition == "service_completed_successfully":
                assert target_spec.get("restart", "no") == "no", f"{target} is not a one-shot"
            if "profiles" not in spec:
                assert "profiles" not in target_spec, (
                    f"{name} starts by default but depends on {target}, which is in a profile"
                )


def test_dependencies_have_no_cycle() -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in depends_on(services()[name]):
                visit(target, (*path, name))
            done.add(name)

    for name in services():
        visit(name, ())


def test_system_processes_wait_for_healthy_services_and_the_migrated_schema() -> None:
    migrations = [name for name, spec in services().items() if runs(spec, "db")]
    assert migrations == ["migrate"]
    assert depends_on(services()["migrate"]) == {"postgres": "service_healthy"}
    for name, spec in project_services().items():
        if runs(spec, *SCALABLE_COMMANDS):
            assert depends_on(spec) == {
                "postgres": "service_healthy",
                "rabbitmq": "service_healthy",
                "migrate": "service_completed_successfully",
            }, name


def test_infrastructure_has_healthchecks() -> None:
    postgres = services()["postgres"]["healthcheck"]["test"]
    rabbitmq = services()["rabbitmq"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(postgres)
    assert "rabbitmq-diagnostics -q ping" in " ".join(rabbitmq)
    for name, spec in services().items():
        test = (spec.get("healthcheck") or {}).get("test")
        if test is not None and not isinstance(test, str):
            assert test[0] in {"CMD", "CMD-SHELL", "NONE"}, f"{name}: bad healthcheck form"


def test_every_service_and_file_the_stack_names_exists() -> None:
    for name, spec in services().items():
        for where, node in (
            ("environment", spec.get("environment")),
            ("command", spec.get("command")),
        ):
            for url in (m.group(0) for text in strings(node) for m in _URL.finditer(text)):
                host = urlsplit(url).hostname
                assert host in services(), f"{name}'s {where} names {host!r}, not a service: {url}"
        for url in (
            m.group(0) for text in strings(spec.get("healthcheck")) for m in _URL.finditer(text)
        ):
            assert urlsplit(url).hostname in {"127.0.0.1", "localhost"}, (name, url)
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in (compose().get("volumes") or {}), f"undeclared volume {source}"


def test_the_integration_suite_is_in_a_profile_and_nothing_else_is() -> None:
    in_profiles = {name for name, spec in services().items() if spec.get("profiles")}
    assert in_profiles == {"tests"}
    assert services()["tests"]["profiles"] == ["test"]


# --------------------------------------------------------------------- commands
def test_every_program_is_the_projects_or_a_declared_dependencys() -> None:
    scripts = set(pyproject()["project"]["scripts"])
    providers = {
        ep.name: ep.dist.name if ep.dist else "" for ep in entry_points(group="console_scripts")
    }
    declared = declared_distributions()
    for name, spec in project_services().items():
        for where, argv in commands(spec):
            program = argv[0]
            if program in scripts or program == "python":
                continue
            assert program in providers, f"{name}'s {where} runs {program}, installed by nothing"
            provider = _requirement_name(providers[program])
            assert provider in declared, (
                f"{name}'s {where} runs {program} of {provider}, not declared in pyproject.toml"
            )


def test_orchestrator_commands_parse_with_the_projects_parser() -> None:
    assert "orchestrator" in pyproject()["project"]["scripts"]
    parsed = 0
    for name, spec in project_services().items():
        for where, argv in commands(spec):
            if argv[0] != "orchestrator":
                continue
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exc:
                # --help exits 0 (the image's default CMD); a bad command exits 2.
                assert exc.code == 0, f"{name}'s {where} does not parse: {shlex.join(argv)}"
            parsed += 1
    assert parsed >= 5


def test_processes_that_load_the_application_are_told_which() -> None:
    for name, spec in project_services().items():
        for args in orchestrator_args(spec):
            if args.command in APP_COMMANDS:
                ref = args.app or environment(spec).get("ORCHESTRATOR_APP")
                assert ref, f"{name} runs `orchestrator {args.command}` without an application"
                app = load_app(ref, Settings())
                assert app.registry.workflows and app.registry.activities, (name, ref)


def test_workers_consume_every_queue_of_the_application() -> None:
    from orchestrator.celery_app import queue_names

    consumed: set[str] = set()
    for name, spec in project_services().items():
        for args in orchestrator_args(spec):
            if args.command == "worker":
                app = load_app(environment(spec)["ORCHESTRATOR_APP"], Settings())
                queues = set(args.queues.split(",")) if args.queues else set(queue_names(app))
                unknown = queues - set(queue_names(app))
                assert not unknown, f"{name} consumes queues the application has not: {unknown}"
                consumed |= queues
    app = load_app(environment(services()["workflow-worker"])["ORCHESTRATOR_APP"], Settings())
    assert consumed == set(queue_names(app)), "some queue has no worker"


def _celery_invocation(argv: list[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """Parse ``celery ...`` with celery's own parser: (options, subcommand, its options)."""
    from celery.bin.celery import celery as celery_cli

    context = celery_cli.make_context("celery", list(argv[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        rest = [*getattr(context, "protected_args", []), *context.args]
    assert rest, f"no celery subcommand in {shlex.join(argv)}"
    subcommand = celery_cli.get_command(context, rest[0])
    assert subcommand is not None, f"celery has no subcommand {rest[0]!r}"
    sub_context = subcommand.make_context(rest[0], rest[1:], parent=context)
    return context.params, rest[0], sub_context.params


def test_celery_commands_name_the_applications_celery_app_and_real_options() -> None:
    from celery import Celery
    from celery.worker.control import Panel
    from flower.options import default_options as flower_options

    checked = set()
    for name, spec in project_services().items():
        for where, argv in commands(spec):
            if argv[0] != "celery":
                continue
            options, subcommand, sub_options = _celery_invocation(argv)
            assert options["app"], f"{name}'s {where} names no --app"
            module = importlib.import_module(options["app"])
            assert isinstance(getattr(module, "celery", None), Celery), options["app"]
            if subcommand == "inspect":
                control = Panel.meta.get(sub_options["command"])
                assert control and control.type == "inspect", f"no inspect {sub_options['command']}"
            if subcommand == "flower":
                for arg in sub_options["tornado_argv"]:
                    option = arg.lstrip("-").split("=", 1)[0]
                    assert option in flower_options, f"flower has no option --{option}"
            checked.add(subcommand)
    assert {"flower", "inspect"} <= checked


def test_flower_requires_credentials_and_reads_only_its_own_variables() -> None:
    from flower.options import default_options as flower_options

    spec = services()["flower"]
    env = environment(spec)
    for key in env:
        if key.startswith("FLOWER_"):
            assert key.removeprefix("FLOWER_").lower() in flower_options, f"flower ignores {key}"
    auth = env.get("FLOWER_BASIC_AUTH") or ""
    assert auth and all(re.fullmatch(r"[^:,]+:[^,]+", pair) for pair in auth.split(",")), (
        "flower must require basic auth (FLOWER_BASIC_AUTH=user:password)"
    )
    assert any(port.endswith(":5555") for port in spec.get("ports", []))


def test_pytest_commands_name_paths_that_exist_and_are_in_the_image() -> None:
    copied = [
        dest
        for keyword, rest in dockerfile_instructions()
        if keyword == "COPY"
        for dest in rest.split()[:-1]
    ]
    for name, spec in project_services().items():
        for where, argv in commands(spec):
            if argv[0] != "pytest":
                continue
            paths = [arg for arg in argv[1:] if not arg.startswith("-")]
            assert paths, f"{name}'s {where} names no test path"
            for path in paths:
                assert (ROOT / path).exists(), f"{name} runs tests in {path}, which does not exist"
                assert any(path == src or path.startswith(f"{src}/") for src in copied), (
                    f"{path} is not copied into the image"
                )


def test_inline_python_compiles() -> None:
    for name, spec in project_services().items():
        for where, argv in commands(spec):
            if argv[0] == "python" and argv[1:2] == ["-c"]:
                compile(argv[2], f"<{name} {where}>", "exec")


# -------------------------------------------------------------------- variables
def test_every_orchestrator_variable_is_a_setting() -> None:
    prefix = Settings.model_config.get("env_prefix", "")
    readers: list[type[BaseSettings]] = [Settings, EventSettings]
    fields = {
        f"{prefix}{field}".upper(): (reader, field)
        for reader in readers
        for field in reader.model_fields
    }
    for name, spec in services().items():
        values: dict[type[BaseSettings], dict[str, Any]] = {reader: {} for reader in readers}
        for key, value in environment(spec).items():
            if not key.startswith("ORCHESTRATOR_") or key in TEST_VARIABLES:
                continue
            assert key in fields, f"{name} sets {key}, which no setting reads (a typo?)"
            reader, field = fields[key]
            values[reader][field] = value
        for reader, given in values.items():
            try:
                reader(**given)
            except ValidationError as exc:
                pytest.fail(f"{name}'s settings are invalid: {exc}")


def test_test_variables_are_only_on_the_test_service() -> None:
    for name, spec in services().items():
        present = TEST_VARIABLES & set(environment(spec))
        assert present == (TEST_VARIABLES if name == "tests" else set()), name


def test_system_processes_share_one_database_and_one_broker() -> None:
    seen = set()
    for name, spec in project_services().items():
        if not runs(spec, *SCALABLE_COMMANDS, "db") and name != "flower":
            continue
        env = environment(spec)
        database, broker = env.get("ORCHESTRATOR_DATABASE_URL"), env.get("ORCHESTRATOR_BROKER_URL")
        assert database and make_url(database).get_backend_name() == "postgresql", name
        assert broker and broker.startswith("amqp://"), name
        seen.add((database, broker))
    assert len(seen) == 1, f"the stack's processes disagree on their services: {seen}"


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def test_the_integration_suite_uses_its_own_database_and_virtual_host() -> None:
    stack = environment(services()["workflow-worker"])
    tests = environment(services()["tests"])
    stack_db = make_url(stack["ORCHESTRATOR_DATABASE_URL"] or "")
    test_db = make_url(tests["ORCHESTRATOR_TEST_DATABASE_URL"] or "")
    assert test_db.host == stack_db.host == "postgres"
    # The suite drops and recreates its database: never the stack's.
    assert test_db.database and test_db.database != stack_db.database
    stack_broker = stack["ORCHESTRATOR_BROKER_URL"] or ""
    test_broker = tests["ORCHESTRATOR_TEST_BROKER_URL"] or ""
    # The suite fails if anything else consumes its queues: the stack's
    # workers must be in another virtual host.
    assert _vhost(test_broker) != _vhost(stack_broker)

    definitions = json.loads(DEFINITIONS.read_text())
    users = {user["name"]: user for user in definitions["users"]}
    granted = {(p["user"], p["vhost"]) for p in definitions["permissions"]}
    vhosts = {vhost["name"] for vhost in definitions["vhosts"]}
    for url in (stack_broker, test_broker):
        parts = urlsplit(url)
        assert _vhost(url) in vhosts, f"virtual host {_vhost(url)!r} is not declared"
        assert parts.username in users, f"user {parts.username!r} is not declared"
        assert users[parts.username].get("password") == parts.password, url
        assert (parts.username, _vhost(url)) in granted, url


def test_the_broker_loads_the_definitions() -> None:
    mounts = dict(volume.split(":")[:2] for volume in services()["rabbitmq"]["volumes"])
    config_source = next(
        src for src, dest in mounts.items() if dest.startswith("/etc/rabbitmq/conf.d/")
    )
    config = (ROOT / config_source).read_text()
    loaded = re.search(r"^load_definitions\s*=\s*(\S+)", config, re.MULTILINE)
    assert loaded, "the broker configuration loads no definitions"
    assert mounts.get("./docker/rabbitmq/definitions.json") == loaded.group(1)


# -------------------------------------------------------------------- Dockerfile
def test_the_image_is_python_slim_and_runs_as_a_user() -> None:
    instructions = dockerfile_instructions()
    bases = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert len(bases) == 1
    base = re.fullmatch(r"python:(\d+)\.(\d+)-slim", bases[0])
    assert base, f"the image must build on python:X.Y-slim, not {bases[0]}"
    lowest = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert lowest
    assert tuple(map(int, base.groups())) >= tuple(map(int, lowest.groups()))
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in {"root", "0"}, "the image must not run as root"
    last_user = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "USER")
    assert all(keyword != "RUN" for keyword, _ in instructions[last_user:]), "RUN after USER"
    assert image_cmd() == ["orchestrator", "--help"]


def test_the_image_holds_every_package_and_installs_the_dev_extra() -> None:
    copies = [rest.split() for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    sources = {src.rstrip("/") for args in copies for src in args[:-1] if not src.startswith("--")}
    for pattern in pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]:
        package = pattern.rstrip("*").rstrip(".")
        assert package in sources, f"package {package} is not copied into the image"
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
    runs_ = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "RUN")
    assert "optional-dependencies']['dev']" in runs_, "the image must install the dev extra"
    assert "pip install --no-deps --editable ." in runs_


def test_the_build_context_leaves_out_environments_caches_and_history() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        ".git",
        ".venv",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        "**/__pycache__",
    ):
        assert needed in patterns, f".dockerignore must exclude {needed}"
    copies = [rest.split() for keyword, rest in dockerfile_instructions() if keyword == "COPY"]
    for source in (src for args in copies for src in args[:-1]):
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), (
            f"{source} is copied but excluded from the build context"
        )


# ------------------------------------------------------------------------- docs
def _documented() -> dict[str, dict[str, str]]:
    """The rows of docs/compose.md's variable table, by variable name."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in DOCS.read_text().splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = [cell.lower() for cell in cells]
            continue
        if set(cells[0]) <= {"-", ":", " "}:
            continue
        if header[0] == "variable":
            rows[cells[0].strip("`")] = dict(
                zip(header, (c.replace("`", "") for c in cells), strict=False)
            )
    return rows


def _render(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_docs_list_every_variable_with_its_default() -> None:
    documented = _documented()
    used = set(host_variables())
    for spec in services().values():
        used |= set(environment(spec))
    missing = used - set(documented)
    assert not missing, f"docs/compose.md does not list {sorted(missing)}"
    prefix = Settings.model_config.get("env_prefix", "")
    for field, info in Settings.model_fields.items():
        name = f"{prefix}{field}".upper()
        if name in documented:
            assert documented[name]["default"] == _render(info.default), name
    for name, default in host_variables().items():
        field = name.removeprefix(prefix.upper()).lower()
        if field in Settings.model_fields:
            # Overridable from the shell, with the same default as when unset.
            assert default == _render(Settings.model_fields[field].default), name
        else:
            assert documented[name]["default"] == default, name

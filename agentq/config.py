"""Loading the config: file, then environment, then flags, over SPEC's defaults."""

from __future__ import annotations

import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from agentq.schemas.config import AgentConfig, Config
from agentq.schemas.errors import InvalidInput

ENV_PREFIX = "AGENTQ_"


def _camel(snake: str) -> str:
    head, *rest = snake.lower().split("_")
    return head + "".join(part.title() for part in rest)


def _yaml(text: str) -> Any:
    """A YAML document's content; its errors as ValueError. yaml is imported here,
    not at the top: it takes a while, and most runs read no YAML file."""
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


def read_file(path: str | Path) -> dict[str, Any]:
    """A config file's raw content (TOML, YAML or JSON, by extension)."""
    file = Path(path)
    if file.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise InvalidInput(
            f"Config file {file}: agentq reads TOML, YAML or JSON, known by the extension "
            f".toml, .yaml, .yml or .json, not {file.suffix or 'none'!r}",
            path=str(file),
        )
    try:
        text = file.read_text()
    except OSError as exc:
        message = f"Cannot read config file {file}: {exc.strerror}"
        raise InvalidInput(message, path=str(file)) from exc
    try:
        if file.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif file.suffix in (".yaml", ".yml"):
            data = _yaml(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"Config file {file} is not valid: {exc}", path=str(file)) from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"Config file {file} must hold an object at the top", path=str(file))
    return data


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's annotation admits (several for a union like ``handler``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for a in typing.get_args(annotation)
            if isinstance(a, type) and issubclass(a, BaseModel)]


def _is_text(annotation: Any) -> bool:
    """Whether a field holds text (``str`` or ``str | None``): its environment
    value is taken as it is, not as JSON, so "2024" stays a string."""
    if annotation is str:
        return True
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return is_union and set(typing.get_args(annotation)) <= {str, type(None)}


@dataclass(frozen=True)
class EnvPath:
    path: list[str]
    text: bool  # the field holds text


def _field_path(model: type[BaseModel], parts: list[str]) -> EnvPath | None:
    """The camelCase path of upper-snake ``parts`` inside ``model``, or None."""
    path: list[str] = []
    models = [model]
    annotation: Any = None
    for part in parts:
        field = next((m.model_fields[part.lower()] for m in models
                      if part.lower() in m.model_fields), None)
        if field is None:
            return None
        path.append(_camel(part))
        annotation = field.annotation
        models = _models_in(annotation)
    return EnvPath(path, _is_text(annotation))


def _env_path(name: str) -> EnvPath | None:
    """The config path an ``AGENTQ_…`` variable names, or None when it names none."""
    if name == "AGENTQ_REDIS_URL":
        return EnvPath(["redis", "url"], text=True)
    parts = name[len(ENV_PREFIX):].split("__")
    if parts[0] == "AGENTS":
        # agents.<id>.<field>: the id is the lower-cased part.
        if len(parts) < 3:
            return None
        rest = _field_path(AgentConfig, parts[2:])
        return EnvPath(["agents", parts[1].lower(), *rest.path], rest.text) if rest else None
    return _field_path(Config, parts)


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        data = data.setdefault(key, {})
    data[path[-1]] = value


def _parse_env_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The config fields set by ``AGENTQ_…`` variables; other names are left alone."""
    data: dict[str, Any] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        target = _env_path(name)
        if target:
            _set_path(data, target.path, value if target.text else _parse_env_value(value))
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def validate(data: Mapping[str, Any], source: str = "config") -> Config:
    """A Config from raw data; InvalidInput naming the path of every bad field."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or '(top)'}: "
            + str(error["msg"]).removeprefix("Value error, ")
            for error in exc.errors()
        ]
        first = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise InvalidInput(f"Invalid {source}: " + "; ".join(problems), path=first) from exc


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """The effective config: flags over environment over file over defaults.

    ``path`` None means ``AGENTQ_CONFIG`` when set, else no file.
    """
    env = os.environ if environ is None else environ
    path = path or env.get("AGENTQ_CONFIG") or None
    data: dict[str, Any] = read_file(path) if path else {}
    data = _merge(data, env_overrides(env))
    if flags:
        data = _merge(data, flags)
    return validate(data, source=f"config {path}" if path else "config")


def embedded_archive(environ: Mapping[str, str] | None = None) -> str:
    """The embedded server's archive: ``AGENTQ_HOME/archive``."""
    from agentq import embedded  # not at the top: the CLI's start stays quick

    return str(embedded.home_dir(environ) / "archive")


def with_embedded_archive(config: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``config``, archiving under ``AGENTQ_HOME/archive`` when it names neither a
    Redis nor an archive. Apply it only where the embedded server is the one
    used (no Redis configured, and no URL given in its place): against a Redis
    of the user's own, no archive means nothing leaves Redis."""
    if config.retention.archive is not None or redis_configured(config):
        return config
    retention = config.retention.model_copy(update={"archive": embedded_archive(environ)})
    return config.model_copy(update={"retention": retention})


def redis_configured(config: Config) -> bool:
    """Whether the config names a Redis server (else agentq uses its embedded one).
    A cluster is always a configured server: ``redis.cluster`` with neither a URL
    nor a host means the cluster node at the default host and port."""
    return config.redis.url is not None or config.redis.is_cluster or bool(
        {"host", "port"} & config.redis.model_fields_set
    )

"""The config file's shape, with SPEC's defaults. camelCase in files."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from agentq.schemas._base import WireModel
from agentq.schemas.job import AGENT_ID_PATTERN

# SPEC's agent id, refused (never rewritten) when malformed; "*" is any agent.
AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
AllowedAgent = Annotated[str, Field(pattern=r"^(?:[a-z0-9][a-z0-9_-]{0,63}|\*)$")]


class TlsConfig(WireModel):
    enabled: bool = False
    # False skips checking the server's certificate (logged as a warning at
    # start); otherwise it is checked against ca_file, else the system's CA store.
    verify: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


class RedisConfig(WireModel):
    url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    username: str | None = None
    password: str | None = None
    db: int = Field(default=0, ge=0)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    # A Redis Cluster: the URL (or host/port) names any one node, the others are
    # discovered. A redis+cluster:// or rediss+cluster:// URL sets it too.
    cluster: bool = False
    # When > 0, a write acknowledged to a caller is first confirmed (WAIT) on this
    # many replicas, waiting at most wait_timeout_ms.
    wait_replicas: int = Field(default=0, ge=0, le=100)
    wait_timeout_ms: int = Field(default=1000, ge=1, le=3_600_000)

    @model_validator(mode="after")
    def _one_database_on_a_cluster(self) -> RedisConfig:
        if self.is_cluster:
            if self.db != 0:
                raise ValueError("a Redis Cluster has only database 0: leave redis.db at 0")
            if self.url is not None and self.url.startswith("unix://"):
                raise ValueError("a Redis Cluster is reached over TCP: redis.url must be "
                                 "redis+cluster://HOST:PORT or rediss+cluster://HOST:PORT")
        return self

    @property
    def is_cluster(self) -> bool:
        """Whether the configured Redis is a cluster (``cluster``, or a cluster URL)."""
        return self.cluster or (self.url is not None and self.url.startswith(CLUSTER_SCHEMES))


class CircuitBreakerConfig(WireModel):
    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout_seconds: float = Field(default=30, gt=0)


class RateLimitConfig(WireModel):
    dispatches_per_minute: int = Field(default=10, ge=0)
    max_queue_depth: int = Field(default=50, ge=0)


class LimitsConfig(WireModel):
    max_depth: int = Field(default=3, ge=0)


class JobsConfig(WireModel):
    max_attempts: int = Field(default=3, ge=1, le=20)
    backoff_base_seconds: float = Field(default=5, ge=0)
    backoff_max_seconds: float = Field(default=300, ge=0)
    lease_seconds: float = Field(default=60, gt=0)
    timeout_seconds: float = Field(default=0, ge=0)
    idempotency_ttl_seconds: int = Field(default=86_400, ge=1)


class WorkersConfig(WireModel):
    heartbeat_timeout_seconds: float = Field(default=30, gt=0)
    shutdown_grace_seconds: float = Field(default=30, ge=0)


class LogSink(WireModel):
    type: Literal["log"]


class WebhookSink(WireModel):
    type: Literal["webhook"]
    url: str


class StreamSink(WireModel):
    type: Literal["stream"]
    key: str


class DlqConfig(WireModel):
    sinks: list[LogSink | WebhookSink | StreamSink] = Field(
        default_factory=lambda: [LogSink(type="log")]  # type: ignore[arg-type]
    )


class ApprovalsConfig(WireModel):
    """Where the news of a job waiting for approval goes (the shapes of ``dlq.sinks``)."""

    sinks: list[LogSink | WebhookSink | StreamSink] = Field(
        default_factory=lambda: [LogSink(type="log")]  # type: ignore[arg-type]
    )


class AuthConfig(WireModel):
    system_agents: list[AgentId] = Field(default_factory=lambda: ["main"], min_length=1)
    # Who may approve or reject a job pending approval; None: the system agents.
    approvers: list[AgentId] | None = None


class ExecHandler(WireModel):
    exec: str


class HttpHandler(WireModel):
    http: str


class PythonHandler(WireModel):
    python: str


class AgentConfig(WireModel):
    allow_agents: list[AllowedAgent] = Field(default_factory=lambda: ["*"])
    concurrency: int = Field(default=1, ge=1, le=1000)
    max_attempts: int | None = Field(default=None, ge=1, le=20)
    timeout_seconds: float | None = Field(default=None, ge=0)
    # Jobs to this agent wait for an approver unless the dispatch says otherwise.
    requires_approval: bool = False
    handler: ExecHandler | HttpHandler | PythonHandler | None = None


ARCHIVE_SCHEMES = ("file://", "s3://")


class RetentionConfig(WireModel):
    """How long things stay in Redis, and where events go before they leave it.

    jobsSeconds: a terminal job leaves Redis (record, spec, view entries,
    dependency sets, log entries) this long after it ended; 0 keeps every job.
    idempotencySeconds: how long an idempotencyKey is remembered. archive:
    file://PATH, a plain path, or s3://BUCKET/PREFIX; with none, nothing leaves
    Redis (an event leaves only once it is archived)."""

    jobs_seconds: int = Field(default=604_800, ge=0)
    idempotency_seconds: int = Field(default=86_400, ge=1)
    archive: str | None = None

    @field_validator("archive")
    @classmethod
    def _archive_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        scheme, sep, rest = url.partition("://")
        if not sep:
            if not url.strip():
                raise ValueError("an empty path: give file://PATH, a path, or "
                                 "s3://BUCKET/PREFIX")
            return url  # a plain path
        if f"{scheme}://" not in ARCHIVE_SCHEMES:
            raise ValueError(f"{scheme}:// is no archive agentq writes to: give file://PATH, "
                             "a path, or s3://BUCKET/PREFIX")
        if not rest.strip("/"):
            what = "a bucket: s3://BUCKET/PREFIX" if scheme == "s3" else "a path: file://PATH"
            raise ValueError(f"{url!r} names no place; it needs {what}")
        return url


def _given(section: Any, camel: str, snake: str) -> Any:
    """A field set explicitly in a config section (raw data or a model), else None."""
    if isinstance(section, WireModel):
        return getattr(section, snake) if snake in section.model_fields_set else None
    if isinstance(section, dict):
        return section.get(camel, section.get(snake))
    return None


def _with(section: Any, snake: str, value: Any) -> Any:
    """``section`` (raw data, a model or None) with field ``snake`` set to ``value``;
    a section of another shape is left for validation to refuse."""
    if isinstance(section, WireModel):
        return section.model_copy(update={snake: value})
    if section is None:
        return {snake: value}
    if isinstance(section, dict):
        return {**section, snake: value}
    return section


class Config(WireModel):
    redis: RedisConfig = Field(default_factory=RedisConfig)
    key_prefix: str = Field(default="aq", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    dlq: DlqConfig = Field(default_factory=DlqConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    approvals: ApprovalsConfig = Field(default_factory=ApprovalsConfig)
    agents: dict[AgentId, AgentConfig] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False})
    retention: RetentionConfig = Field(default_factory=RetentionConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_idempotency_window(cls, data: Any) -> Any:
        """``jobs.idempotencyTtlSeconds`` is the older name of
        ``retention.idempotencySeconds``: either may be set, both only alike, and
        the validated config carries the value in both places."""
        if not isinstance(data, dict):
            return data
        old = _given(data.get("jobs"), "idempotencyTtlSeconds", "idempotency_ttl_seconds")
        new = _given(data.get("retention"), "idempotencySeconds", "idempotency_seconds")
        if old is not None and new is not None and str(old) != str(new):
            raise ValueError(
                f"retention.idempotencySeconds ({new}) and jobs.idempotencyTtlSeconds ({old}) "
                "differ: set only retention.idempotencySeconds (jobs.idempotencyTtlSeconds "
                "is its older name)")
        if (old is None) == (new is None):
            return data
        data = dict(data)
        if new is None:
            data["retention"] = _with(data.get("retention"), "idempotency_seconds", old)
        else:
            data["jobs"] = _with(data.get("jobs"), "idempotency_ttl_seconds", new)
        return data

    def is_system(self, agent: str) -> bool:
        return agent in self.auth.system_agents

    def is_approver(self, agent: str) -> bool:
        """Whether ``agent`` may approve or reject jobs (``auth.approvers``, by
        default the system agents)."""
        approvers = self.auth.approvers
        return agent in (self.auth.system_agents if approvers is None else approvers)

    @property
    def operator(self) -> str:
        """The CLI's caller when no ``--as`` is given: the first system agent."""
        return self.auth.system_agents[0]


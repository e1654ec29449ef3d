//! Configuration: `config/logpipe.toml`, overridden by `LOGPIPE_<SECTION>_<KEY>` variables.
//!
//! Every field has a default equal to the value in the shipped `config/logpipe.toml` (a test
//! keeps the two equal). Unknown keys are rejected, and [`Config::validate`] names the setting
//! whose value is out of range, so a typo or a bad value stops startup instead of being ignored.

use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The prefix of every environment variable that overrides a setting.
pub const ENV_PREFIX: &str = "LOGPIPE_";

/// `LOGPIPE_` variables that are not settings: the configuration file and the API key of
/// `logpipe replay`.
const NOT_SETTINGS: &[&str] = &["CONFIG", "API_KEY"];

/// A setting that could not be read or is out of range; the message names the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    fn invalid(setting: &str, problem: impl std::fmt::Display) -> Self {
        Self(format!("invalid setting {setting}: {problem}"))
    }
}

/// The whole configuration, one field per section of `config/logpipe.toml`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub postgres: PostgresConfig,
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    pub producer: ProducerConfig,
    pub consumer: ConsumerConfig,
    pub db_writer: DbWriterConfig,
    pub rate_limit: RateLimitConfig,
    pub auth: AuthConfig,
    pub mailbox: MailboxConfig,
    pub supervision: SupervisionConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

/// The HTTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address and port to listen on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// Worker threads; 0 means one per CPU core. Default 0.
    pub workers: usize,
    /// Largest accepted request body, in bytes. Default 5 MiB.
    pub body_limit_bytes: usize,
    /// How long an ingest request may wait for the rate limiter and Kafka before it gets
    /// 503, in milliseconds. Default 2000.
    pub ingest_deadline_ms: u64,
    /// Seconds a client should wait (`Retry-After`) after a 503. Default 1.
    pub retry_after_secs: u64,
    /// Longest time a graceful shutdown may take, in seconds: requests in flight, the
    /// producer's queue and the consumers' current batches. Default 30.
    pub shutdown_timeout_secs: u64,
    /// Most `POST /api/logs/` requests handled at once; more get 503 at once, before
    /// their body is read. Default 256.
    pub max_in_flight_requests: usize,
    /// Most request body bytes of `POST /api/logs/` held at once (by `Content-Length`, or
    /// `body_limit_bytes` when it is absent); more get 503 at once. Bounds the memory of
    /// requests in flight. Default 64 MiB.
    pub max_in_flight_body_bytes: usize,
    /// Maximum time reading the body of `POST /api/logs/` may take, in milliseconds. A
    /// slower client gets 408 and frees its share of the in-flight limits. Default 10000.
    pub body_read_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            body_limit_bytes: 5 * 1024 * 1024,
            ingest_deadline_ms: 2000,
            retry_after_secs: 1,
            shutdown_timeout_secs: 30,
            max_in_flight_requests: 256,
            max_in_flight_body_bytes: 64 * 1024 * 1024,
            body_read_timeout_ms: 10_000,
        }
    }
}

/// The PostgreSQL database holding users, keys and logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL. Default `postgres://logpipe:logpipe@127.0.0.1:5432/logpipe`.
    pub url: String,
    /// Connections in the pool. Default 16.
    pub pool_size: usize,
    /// How long to wait for a connection, in milliseconds. Default 3000.
    pub connect_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: "postgres://logpipe:logpipe@127.0.0.1:5432/logpipe".into(),
            pool_size: 16,
            connect_timeout_ms: 3000,
        }
    }
}

/// The Redis server behind the rate limiter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Connection URL. Default `redis://127.0.0.1:6379`.
    pub url: String,
    /// How long one rate-limit decision may wait for Redis before
    /// `rate_limit.on_store_error` applies, in milliseconds. Default 50.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            timeout_ms: 50,
        }
    }
}

/// The Kafka cluster and topic that carry events from the API to the consumers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port`. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Topic the events are published to. Default `logpipe.events`.
    pub topic: String,
    /// Partitions of the topic when logpipe creates it. Default 3.
    pub partitions: i32,
    /// Replication factor of the topic when logpipe creates it. Default 1.
    pub replication_factor: i32,
    /// Create the topic at startup if it does not exist. Default true.
    pub create_topic: bool,
    /// Client id sent to the brokers. Default `logpipe`.
    pub client_id: String,
    /// Topic that receives messages the consumers can never store, with the error in the
    /// `logpipe-error` header. Default `logpipe.events.dlq`.
    pub dead_letter_topic: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topic: "logpipe.events".into(),
            partitions: 3,
            replication_factor: 1,
            create_topic: true,
            client_id: "logpipe".into(),
            dead_letter_topic: "logpipe.events.dlq".into(),
        }
    }
}

/// The Kafka producer used by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerConfig {
    /// Time the producer waits to fill a batch, in milliseconds (`linger.ms`). Default 5.
    pub linger_ms: u64,
    /// Time after which an unacknowledged event counts as failed, in milliseconds
    /// (`delivery.timeout.ms`). Keep it below `http.ingest_deadline_ms`. Default 1500.
    pub delivery_timeout_ms: u64,
    /// Events the producer may hold before new ones are rejected with 503
    /// (`queue.buffering.max.messages`). Default 100000.
    pub queue_max_messages: u64,
    /// Compression codec: `none`, `gzip`, `snappy`, `lz4` or `zstd`. Default `lz4`.
    pub compression: String,
    /// Bytes of events the producer may hold unacknowledged, in KiB
    /// (`queue.buffering.max.kbytes`). Default 65536 (64 MiB).
    pub queue_max_kbytes: u64,
    /// Largest Kafka message, in bytes (`message.max.bytes`); an event whose encoded form
    /// is larger gets 400. Keep it at or below the broker's limit. Default 1000000.
    pub max_message_bytes: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        Self {
            linger_ms: 5,
            delivery_timeout_ms: 1500,
            queue_max_messages: 100_000,
            compression: "lz4".into(),
            queue_max_kbytes: 65_536,
            max_message_bytes: 1_000_000,
        }
    }
}

/// The Kafka consumers that feed `DbWriter`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsumerConfig {
    /// Consumer group id. Default `logpipe`.
    pub group_id: String,
    /// Consumers this process runs in the group. Default 2.
    pub consumers: usize,
    /// Group session timeout, in milliseconds (`session.timeout.ms`). Default 10000.
    pub session_timeout_ms: u64,
    /// How often each consumer samples its partitions' lag (high watermark minus committed
    /// offset) for the `logpipe.kafka.consumer.lag` metric, in milliseconds
    /// (`statistics.interval.ms`). Default 10000.
    pub lag_sample_interval_ms: u64,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group_id: "logpipe".into(),
            consumers: 2,
            session_timeout_ms: 10_000,
            lag_sample_interval_ms: 10_000,
        }
    }
}

/// Grouping of consumed events into PostgreSQL transactions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbWriterConfig {
    /// Most events written in one transaction. Default 1000.
    pub batch_size: usize,
    /// Longest time a consumed event waits for its batch to fill, in milliseconds.
    /// Default 200.
    pub flush_interval_ms: u64,
    /// Delay between attempts to write a batch while PostgreSQL fails, in milliseconds.
    /// Default 1000.
    pub retry_delay_ms: u64,
}

impl Default for DbWriterConfig {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            flush_interval_ms: 200,
            retry_delay_ms: 1000,
        }
    }
}

/// The per-key request rate limit on `POST /api/logs/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Requests per minute per API key, from 1 to 60,000,000. Default 100.
    pub requests_per_minute: u32,
    /// Requests a key may make at once after being idle; 0 means equal to
    /// `requests_per_minute`. Default 0.
    pub burst: u32,
    /// What decides while Redis is unreachable: `local` (each instance limits in its own
    /// memory), `allow` (no limit) or `deny` (503). Default `local`.
    pub on_store_error: StoreErrorPolicy,
    /// Most checks sent to Redis in one pipeline; 1 sends each check on its own.
    /// Default 128.
    pub max_batch: usize,
    /// Failed logins per minute per username and per client address, after which
    /// `POST /api/auth/login/` returns 429. Default 10.
    pub login_failures_per_minute: u32,
}

/// Behaviour of the rate limiter while Redis is unreachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreErrorPolicy {
    Local,
    Allow,
    Deny,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            requests_per_minute: 100,
            burst: 0,
            on_store_error: StoreErrorPolicy::Local,
            max_batch: 128,
            login_failures_per_minute: 10,
        }
    }
}

impl RateLimitConfig {
    /// Returns the burst in effect: `burst`, or the per-minute limit when `burst` is 0.
    pub fn effective_burst(&self) -> u32 {
        if self.burst == 0 {
            self.requests_per_minute
        } else {
            self.burst
        }
    }
}

/// Accounts and tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Secret that signs the JWTs (HS256), at least 32 bytes. Empty means a random one
    /// per start, so tokens do not survive a restart. Default empty.
    pub jwt_secret: String,
    /// Lifetime of an access token, in seconds. Default 900 (15 minutes).
    pub access_token_ttl_secs: u64,
    /// Lifetime of a refresh token, in seconds. Default 604800 (7 days).
    pub refresh_token_ttl_secs: u64,
    /// How long an API-key lookup is cached, in milliseconds; a revoked key or a changed
    /// limit takes effect within this time. 0 disables the cache. Default 500.
    pub api_key_cache_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            jwt_secret: String::new(),
            access_token_ttl_secs: 900,
            refresh_token_ttl_secs: 7 * 24 * 3600,
            api_key_cache_ms: 500,
        }
    }
}

/// Mailbox capacities: messages an actor may have queued before senders get 503.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailboxConfig {
    /// `RateLimiter` mailbox capacity. Default 1024.
    pub rate_limiter: usize,
    /// `KafkaProducer` mailbox capacity. Default 1024.
    pub kafka_producer: usize,
    /// `DbWriter` mailbox capacity. Default 64.
    pub db_writer: usize,
    /// `ConsumerSupervisor` mailbox capacity. Default 16.
    pub consumer_supervisor: usize,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        Self {
            rate_limiter: 1024,
            kafka_producer: 1024,
            db_writer: 64,
            consumer_supervisor: 16,
        }
    }
}

/// Restart delays of supervisors for a failed actor or consumer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisionConfig {
    /// Delay before a failed actor or consumer is started again, in milliseconds; it
    /// doubles with each failure in a row. Default 500.
    pub restart_initial_delay_ms: u64,
    /// Maximum delay between restarts, in milliseconds. Default 30000.
    pub restart_max_delay_ms: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        Self {
            restart_initial_delay_ms: 500,
            restart_max_delay_ms: 30_000,
        }
    }
}

impl SupervisionConfig {
    /// Returns the delay before restart number `failures` in a row: the initial delay,
    /// doubled for each earlier failure, capped at the maximum.
    pub fn restart_delay(&self, failures: u32) -> std::time::Duration {
        let doubling = 1u64 << failures.saturating_sub(1).min(20);
        let delay = self.restart_initial_delay_ms.saturating_mul(doubling);
        std::time::Duration::from_millis(delay.min(self.restart_max_delay_ms))
    }
}

/// logpipe's own log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Filter in `RUST_LOG` syntax. `RUST_LOG`, when set, wins. Default `info`.
    pub level: String,
    /// Output format: `text` or `json`. Default `text`.
    pub format: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: "text".into(),
        }
    }
}

/// OpenTelemetry export (traces, metrics, logs) and the `GET /metrics` page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP receiver, such as `http://127.0.0.1:4318`; traces go to
    /// `/v1/traces`, metrics to `/v1/metrics` and logs to `/v1/logs` under it. Empty means
    /// nothing is exported. `OTEL_EXPORTER_OTLP_ENDPOINT` sets it too. Default empty.
    pub otlp_endpoint: String,
    /// `http/protobuf` or `http/json`. `OTEL_EXPORTER_OTLP_PROTOCOL` sets it too.
    /// Default `http/protobuf`.
    pub otlp_protocol: String,
    /// Maximum time one export request may take, in milliseconds. Default 10000.
    pub otlp_timeout_ms: u64,
    /// `service.name` of logpipe's own traces, metrics and logs. `OTEL_SERVICE_NAME` sets it
    /// too. Default `logpipe`.
    pub service_name: String,
    /// Share of new traces that are recorded, from 0.0 to 1.0; a request that carries a
    /// `traceparent` follows its caller's decision. Default 1.0.
    pub trace_sample_ratio: f64,
    /// How often metrics are exported, in milliseconds. Default 15000.
    pub metric_interval_ms: u64,
    /// Export every stored event as an OpenTelemetry log record under its own
    /// `service.name`. Default true.
    pub export_events: bool,
    /// Most event log records waiting for export; when it is full, new records are dropped
    /// and counted, and ingestion goes on. Default 8192.
    pub event_queue_size: usize,
    /// Most bytes of event log records waiting for export, in KiB; past it new records are
    /// dropped and counted. Default 16384 (16 MiB).
    pub event_queue_kbytes: usize,
    /// Most event log records in one export request. Default 512.
    pub event_batch_size: usize,
    /// Distinct event service names that get their own series in the events metric; the
    /// others are counted under `other`. Default 200.
    pub metric_service_limit: usize,
    /// Serve `GET /metrics` in Prometheus text format. Default true.
    pub prometheus: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            otlp_protocol: "http/protobuf".into(),
            otlp_timeout_ms: 10_000,
            service_name: "logpipe".into(),
            trace_sample_ratio: 1.0,
            metric_interval_ms: 15_000,
            export_events: true,
            event_queue_size: 8192,
            event_queue_kbytes: 16 * 1024,
            event_batch_size: 512,
            metric_service_limit: 200,
            prometheus: true,
        }
    }
}

/// Standard OpenTelemetry variables and the settings they set. `LOGPIPE_` variables win
/// over them.
const OTEL_VARIABLES: &[(&str, &str)] = &[
    ("OTEL_EXPORTER_OTLP_ENDPOINT", "otlp_endpoint"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "otlp_protocol"),
    ("OTEL_SERVICE_NAME", "service_name"),
];

impl Config {
    /// Loads the file at `path` (or only the defaults when `path` is `None`), applies the
    /// `LOGPIPE_*` variables of `env`, and validates the result.
    pub fn load<I>(path: Option<&Path>, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let mut table = match path {
            Some(path) => read_table(path)?,
            None => toml::Table::new(),
        };
        let env: Vec<(String, String)> = env.into_iter().collect();
        check_otel_env(&env)?;
        apply_otel_env(&mut table, &env);
        apply_env(&mut table, env)?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|err: toml::de::Error| ConfigError(format!("invalid configuration: {err}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value that the types alone do not constrain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        SocketAddr::from_str(&self.http.listen).map_err(|_| {
            ConfigError::invalid(
                "http.listen",
                format!(
                    "{:?} is not an IP address and port such as 127.0.0.1:8080 or [::]:8080",
                    self.http.listen
                ),
            )
        })?;
        at_least(
            "http.body_limit_bytes",
            self.http.body_limit_bytes as u64,
            1024,
        )?;
        at_least("http.ingest_deadline_ms", self.http.ingest_deadline_ms, 100)?;
        at_least("http.retry_after_secs", self.http.retry_after_secs, 1)?;
        at_least(
            "http.shutdown_timeout_secs",
            self.http.shutdown_timeout_secs,
            1,
        )?;
        at_least(
            "http.max_in_flight_requests",
            self.http.max_in_flight_requests as u64,
            1,
        )?;
        at_least(
            "http.body_read_timeout_ms",
            self.http.body_read_timeout_ms,
            100,
        )?;
        if self.http.max_in_flight_body_bytes < self.http.body_limit_bytes {
            return Err(ConfigError::invalid(
                "http.max_in_flight_body_bytes",
                "must be at least http.body_limit_bytes, or a body of the largest size could never be accepted",
            ));
        }
        tokio_postgres::Config::from_str(&self.postgres.url)
            .map_err(|err| ConfigError::invalid("postgres.url", err))?;
        at_least("postgres.pool_size", self.postgres.pool_size as u64, 1)?;
        at_least(
            "postgres.connect_timeout_ms",
            self.postgres.connect_timeout_ms,
            1,
        )?;
        redis::Client::open(self.redis.url.as_str())
            .map_err(|err| ConfigError::invalid("redis.url", err))?;
        at_least("redis.timeout_ms", self.redis.timeout_ms, 1)?;
        self.validate_kafka()?;
        at_least("db_writer.batch_size", self.db_writer.batch_size as u64, 1)?;
        at_most(
            "db_writer.batch_size",
            self.db_writer.batch_size as u64,
            50_000,
        )?;
        at_least(
            "db_writer.flush_interval_ms",
            self.db_writer.flush_interval_ms,
            1,
        )?;
        at_least("db_writer.retry_delay_ms", self.db_writer.retry_delay_ms, 1)?;
        at_least(
            "rate_limit.requests_per_minute",
            self.rate_limit.requests_per_minute.into(),
            1,
        )?;
        // The limiter counts in whole microseconds between requests, so a higher limit
        // would make that interval 0 and divide by it.
        at_most(
            "rate_limit.requests_per_minute",
            self.rate_limit.requests_per_minute.into(),
            60_000_000,
        )?;
        at_least("rate_limit.max_batch", self.rate_limit.max_batch as u64, 1)?;
        at_least(
            "rate_limit.login_failures_per_minute",
            self.rate_limit.login_failures_per_minute.into(),
            1,
        )?;
        self.validate_auth()?;
        at_least("mailbox.rate_limiter", self.mailbox.rate_limiter as u64, 1)?;
        at_least(
            "mailbox.kafka_producer",
            self.mailbox.kafka_producer as u64,
            1,
        )?;
        at_least("mailbox.db_writer", self.mailbox.db_writer as u64, 1)?;
        at_least(
            "mailbox.consumer_supervisor",
            self.mailbox.consumer_supervisor as u64,
            1,
        )?;
        one_of("log.format", &self.log.format, &["text", "json"])?;
        self.validate_telemetry()?;
        Ok(())
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        not_empty("kafka.brokers", &self.kafka.brokers)?;
        not_empty("kafka.topic", &self.kafka.topic)?;
        topic_name("kafka.topic", &self.kafka.topic)?;
        topic_name("kafka.dead_letter_topic", &self.kafka.dead_letter_topic)?;
        if self.kafka.dead_letter_topic == self.kafka.topic {
            return Err(ConfigError::invalid(
                "kafka.dead_letter_topic",
                "must differ from kafka.topic",
            ));
        }
        at_least("kafka.partitions", self.kafka.partitions as u64, 1)?;
        at_least(
            "kafka.replication_factor",
            self.kafka.replication_factor as u64,
            1,
        )?;
        not_empty("kafka.client_id", &self.kafka.client_id)?;
        at_least(
            "producer.delivery_timeout_ms",
            self.producer.delivery_timeout_ms,
            1,
        )?;
        if self.producer.delivery_timeout_ms >= self.http.ingest_deadline_ms {
            return Err(ConfigError::invalid(
                "producer.delivery_timeout_ms",
                format!(
                    "must be below http.ingest_deadline_ms ({} ms), so that a request never \
                     times out while its events may still be delivered",
                    self.http.ingest_deadline_ms
                ),
            ));
        }
        at_least(
            "producer.queue_max_messages",
            self.producer.queue_max_messages,
            1,
        )?;
        at_least(
            "producer.queue_max_kbytes",
            self.producer.queue_max_kbytes,
            1,
        )?;
        at_least(
            "producer.max_message_bytes",
            self.producer.max_message_bytes as u64,
            1000,
        )?;
        one_of(
            "producer.compression",
            &self.producer.compression,
            &["none", "gzip", "snappy", "lz4", "zstd"],
        )?;
        not_empty("consumer.group_id", &self.consumer.group_id)?;
        at_least("consumer.consumers", self.consumer.consumers as u64, 1)?;
        at_least(
            "consumer.session_timeout_ms",
            self.consumer.session_timeout_ms,
            1000,
        )?;
        Ok(())
    }

    fn validate_telemetry(&self) -> Result<(), ConfigError> {
        let telemetry = &self.telemetry;
        let endpoint = telemetry.otlp_endpoint.trim();
        if !endpoint.is_empty() {
            let scheme_ok = endpoint.starts_with("http://") || endpoint.starts_with("https://");
            if !scheme_ok || reqwest::Url::parse(endpoint).is_err() {
                return Err(ConfigError::invalid(
                    "telemetry.otlp_endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                ));
            }
        }

        if telemetry.otlp_protocol == "grpc" {
            return Err(ConfigError::invalid(
                "telemetry.otlp_protocol",
                "grpc is not supported; use http/protobuf (the collector's port 4318) or http/json",
            ));
        }
        one_of(
            "telemetry.otlp_protocol",
            &telemetry.otlp_protocol,
            &["http/protobuf", "http/json"],
        )?;

        at_least("telemetry.otlp_timeout_ms", telemetry.otlp_timeout_ms, 100)?;
        not_empty("telemetry.service_name", &telemetry.service_name)?;

        if !(0.0..=1.0).contains(&telemetry.trace_sample_ratio) {
            return Err(ConfigError::invalid(
                "telemetry.trace_sample_ratio",
                format!(
                    "must be from 0.0 to 1.0 (got {})",
                    telemetry.trace_sample_ratio
                ),
            ));
        }

        at_least(
            "telemetry.metric_interval_ms",
            telemetry.metric_interval_ms,
            100,
        )?;
        at_least(
            "telemetry.event_queue_size",
            telemetry.event_queue_size as u64,
            1,
        )?;
        at_least(
            "telemetry.event_batch_size",
            telemetry.event_batch_size as u64,
            1,
        )?;
        at_least(
            "telemetry.event_queue_kbytes",
            telemetry.event_queue_kbytes as u64,
            1024,
        )?;
        at_least(
            "consumer.lag_sample_interval_ms",
            self.consumer.lag_sample_interval_ms,
            100,
        )?;
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let secret_len = self.auth.jwt_secret.len();
        if secret_len > 0 && secret_len < 32 {
            return Err(ConfigError::invalid(
                "auth.jwt_secret",
                format!("must be at least 32 bytes long (got {secret_len}), or empty"),
            ));
        }
        at_least(
            "auth.access_token_ttl_secs",
            self.auth.access_token_ttl_secs,
            1,
        )?;
        at_least(
            "auth.refresh_token_ttl_secs",
            self.auth.refresh_token_ttl_secs,
            1,
        )?;
        at_most("auth.api_key_cache_ms", self.auth.api_key_cache_ms, 60_000)?;
        Ok(())
    }
}

fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError(format!(
            "cannot read configuration file {}: {err}",
            path.display()
        ))
    })?;
    toml::from_str(&text).map_err(|err| {
        ConfigError(format!(
            "invalid configuration file {}: {err}",
            path.display()
        ))
    })
}

/// Checks the standard OpenTelemetry variables that logpipe passes on without a setting
/// of its own: the endpoint of one signal, and the compression.
fn check_otel_env(env: &[(String, String)]) -> Result<(), ConfigError> {
    for (name, raw) in env {
        let value = raw.trim();
        if value.is_empty() {
            continue;
        }
        let signal_endpoint = matches!(
            name.as_str(),
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                | "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"
                | "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"
        );
        let http_url = (value.starts_with("http://") || value.starts_with("https://"))
            && reqwest::Url::parse(value).is_ok();
        if signal_endpoint && !http_url {
            return Err(ConfigError(format!(
                "invalid variable {name}: {value:?} is not an http:// or https:// URL"
            )));
        }
        let compression = name.starts_with("OTEL_EXPORTER_OTLP_") && name.ends_with("COMPRESSION");
        if compression && !matches!(value, "gzip" | "none") {
            return Err(ConfigError(format!(
                "invalid variable {name}: {value:?} is not gzip or none"
            )));
        }
    }
    Ok(())
}

/// Applies the standard OpenTelemetry variables of `OTEL_VARIABLES` to the `telemetry`
/// section. An empty variable counts as unset.
fn apply_otel_env(table: &mut toml::Table, env: &[(String, String)]) {
    for (name, raw) in env {
        let Some((_, key)) = OTEL_VARIABLES.iter().find(|(var, _)| var == name) else {
            continue;
        };
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let section = table
            .entry("telemetry")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(section) = section {
            section.insert((*key).to_string(), toml::Value::String(raw.to_string()));
        }
    }
}

/// Applies each `LOGPIPE_<SECTION>_<KEY>` variable to `table`, parsing the value as the
/// type of that setting's default. The variables in `NOT_SETTINGS` are skipped.
fn apply_env<I>(table: &mut toml::Table, env: I) -> Result<(), ConfigError>
where
    I: IntoIterator<Item = (String, String)>,
{
    let defaults = default_table();
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if NOT_SETTINGS.contains(&rest) {
            continue;
        }
        let (section, key, default) = find_setting(&defaults, rest).ok_or_else(|| {
            ConfigError(format!("unknown setting in environment variable {name}"))
        })?;
        let value = parse_env_value(default, &raw).ok_or_else(|| {
            ConfigError(format!(
                "invalid setting {section}.{key} from {name}: cannot read {raw:?} as {}",
                default.type_str()
            ))
        })?;
        let section_table = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match section_table {
            toml::Value::Table(section_table) => {
                section_table.insert(key, value);
            }
            _ => {
                return Err(ConfigError(format!(
                    "invalid configuration: {section} is not a section"
                )))
            }
        }
    }
    Ok(())
}

fn default_table() -> toml::Table {
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

/// Splits `HTTP_BODY_LIMIT_BYTES` into the section and key it names, if any.
fn find_setting<'a>(
    defaults: &'a toml::Table,
    rest: &str,
) -> Option<(String, String, &'a toml::Value)> {
    for (section, value) in defaults {
        let toml::Value::Table(keys) = value else {
            continue;
        };
        let Some(key) = rest
            .strip_prefix(&section.to_ascii_uppercase())
            .and_then(|key| key.strip_prefix('_'))
        else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if let Some(default) = keys.get(&key) {
            return Some((section.clone(), key, default));
        }
    }
    None
}

fn parse_env_value(default: &toml::Value, raw: &str) -> Option<toml::Value> {
    let raw = raw.trim();
    match default {
        toml::Value::String(_) => Some(toml::Value::String(raw.to_string())),
        toml::Value::Integer(_) => raw.replace('_', "").parse().ok().map(toml::Value::Integer),
        toml::Value::Boolean(_) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Some(toml::Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Some(toml::Value::Boolean(false)),
            _ => None,
        },
        toml::Value::Float(_) => raw.parse().ok().map(toml::Value::Float),
        _ => None,
    }
}

fn at_least(setting: &str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::invalid(
            setting,
            format!("must be at least {min} (got {value})"),
        ));
    }
    Ok(())
}

fn at_most(setting: &str, value: u64, max: u64) -> Result<(), ConfigError> {
    if value > max {
        return Err(ConfigError::invalid(
            setting,
            format!("must be at most {max} (got {value})"),
        ));
    }
    Ok(())
}

fn not_empty(setting: &str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::invalid(setting, "must not be empty"));
    }
    Ok(())
}

fn topic_name(setting: &str, value: &str) -> Result<(), ConfigError> {
    let valid = !value.is_empty()
        && value.len() <= 249
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(ConfigError::invalid(
            setting,
            format!(
                "{value:?} is not a topic name: use 1 to 249 letters, digits, '.', '_' and '-'"
            ),
        ));
    }
    Ok(())
}

fn one_of(setting: &str, value: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    if !allowed.contains(&value) {
        return Err(ConfigError::invalid(
            setting,
            format!("must be one of {} (got {value:?})", allowed.join(", ")),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn shipped_file() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/logpipe.toml")
    }

    #[test]
    fn shipped_file_equals_defaults() {
        let config = Config::load(Some(&shipped_file()), Vec::new()).expect("shipped config loads");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn shipped_file_sets_every_key() {
        let text = std::fs::read_to_string(shipped_file()).expect("shipped config readable");
        let shipped: toml::Table = toml::from_str(&text).expect("shipped config parses");
        for (section, keys) in default_table() {
            let toml::Value::Table(keys) = keys else {
                continue;
            };
            let shipped_section = shipped.get(&section).and_then(|v| v.as_table());
            assert!(
                shipped_section.is_some(),
                "section [{section}] missing from the file"
            );
            for key in keys.keys() {
                let present = shipped_section.is_some_and(|s| s.contains_key(key));
                assert!(present, "{section}.{key} missing from the file");
            }
        }
    }

    #[test]
    fn env_overrides_each_type() {
        let vars = env(&[
            ("LOGPIPE_HTTP_LISTEN", "0.0.0.0:9000"),
            ("LOGPIPE_POSTGRES_POOL_SIZE", "4"),
            ("LOGPIPE_KAFKA_CREATE_TOPIC", "false"),
            ("LOGPIPE_DB_WRITER_BATCH_SIZE", "250"),
            ("LOGPIPE_RATE_LIMIT_REQUESTS_PER_MINUTE", "7"),
            ("LOGPIPE_CONFIG", "ignored.toml"),
            ("LOGPIPE_API_KEY", "lp_not_a_setting"),
            ("PATH", "/bin"),
        ]);
        let config = Config::load(None, vars).expect("valid overrides");
        assert_eq!(config.http.listen, "0.0.0.0:9000");
        assert_eq!(config.postgres.pool_size, 4);
        assert!(!config.kafka.create_topic);
        assert_eq!(config.db_writer.batch_size, 250);
        assert_eq!(config.rate_limit.requests_per_minute, 7);
    }

    #[test]
    fn otel_variables_set_telemetry() {
        let vars = env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_SERVICE_NAME", "ingest-eu"),
        ]);
        let config = Config::load(None, vars).expect("valid variables");
        assert_eq!(config.telemetry.otlp_endpoint, "http://collector:4318");
        assert_eq!(config.telemetry.otlp_protocol, "http/json");
        assert_eq!(config.telemetry.service_name, "ingest-eu");

        let vars = env(&[
            ("OTEL_SERVICE_NAME", "from-otel"),
            ("LOGPIPE_TELEMETRY_SERVICE_NAME", "from-logpipe"),
        ]);
        let config = Config::load(None, vars).expect("valid variables");
        assert_eq!(config.telemetry.service_name, "from-logpipe");
    }

    #[test]
    fn invalid_telemetry_settings_name_the_setting() {
        for (variable, value, setting) in [
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "collector:4318",
                "telemetry.otlp_endpoint",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "grpc",
                "telemetry.otlp_protocol",
            ),
            (
                "OTEL_EXPORTER_OTLP_PROTOCOL",
                "thrift",
                "telemetry.otlp_protocol",
            ),
            (
                "LOGPIPE_TELEMETRY_TRACE_SAMPLE_RATIO",
                "1.5",
                "telemetry.trace_sample_ratio",
            ),
            (
                "LOGPIPE_TELEMETRY_EVENT_QUEUE_SIZE",
                "0",
                "telemetry.event_queue_size",
            ),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "garbage",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ),
            (
                "OTEL_EXPORTER_OTLP_COMPRESSION",
                "zstdx",
                "OTEL_EXPORTER_OTLP_COMPRESSION",
            ),
        ] {
            let err = Config::load(None, env(&[(variable, value)])).unwrap_err();
            let message = err.to_string();
            assert!(message.contains(setting), "{variable}={value}: {message}");
        }
    }

    #[test]
    fn env_bad_integer_names_setting() {
        let err = Config::load(None, env(&[("LOGPIPE_POSTGRES_POOL_SIZE", "many")])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("postgres.pool_size"), "{message}");
        assert!(message.contains("LOGPIPE_POSTGRES_POOL_SIZE"), "{message}");
    }

    #[test]
    fn rate_limit_above_one_per_microsecond_rejected() {
        let vars = env(&[("LOGPIPE_RATE_LIMIT_REQUESTS_PER_MINUTE", "60000001")]);
        let message = Config::load(None, vars).unwrap_err().to_string();
        assert!(
            message.contains("rate_limit.requests_per_minute"),
            "{message}"
        );
        assert!(message.contains("at most 60000000"), "{message}");

        let vars = env(&[("LOGPIPE_RATE_LIMIT_REQUESTS_PER_MINUTE", "60000000")]);
        assert!(Config::load(None, vars).is_ok());
    }

    #[test]
    fn env_unknown_setting_rejected() {
        let err = Config::load(None, env(&[("LOGPIPE_HTTP_LISTENER", "x")])).unwrap_err();
        assert!(err.to_string().contains("LOGPIPE_HTTP_LISTENER"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_setting() {
        let cases = [
            ("LOGPIPE_HTTP_LISTEN", "not an address", "http.listen"),
            ("LOGPIPE_POSTGRES_POOL_SIZE", "0", "postgres.pool_size"),
            ("LOGPIPE_REDIS_URL", "http://x", "redis.url"),
            ("LOGPIPE_KAFKA_TOPIC", "bad topic!", "kafka.topic"),
            (
                "LOGPIPE_PRODUCER_COMPRESSION",
                "brotli",
                "producer.compression",
            ),
            (
                "LOGPIPE_PRODUCER_DELIVERY_TIMEOUT_MS",
                "9000",
                "producer.delivery_timeout_ms",
            ),
            ("LOGPIPE_AUTH_JWT_SECRET", "short", "auth.jwt_secret"),
            ("LOGPIPE_LOG_FORMAT", "xml", "log.format"),
            ("LOGPIPE_MAILBOX_DB_WRITER", "0", "mailbox.db_writer"),
            (
                "LOGPIPE_RATE_LIMIT_ON_STORE_ERROR",
                "panic",
                "rate_limit.on_store_error",
            ),
            ("LOGPIPE_RATE_LIMIT_MAX_BATCH", "0", "rate_limit.max_batch"),
        ];
        for (name, value, setting) in cases {
            let err = Config::load(None, env(&[(name, value)])).unwrap_err();
            assert!(err.to_string().contains(setting), "{name}={value}: {err}");
        }
    }

    #[test]
    fn unknown_key_in_file_rejected() {
        let dir = std::env::temp_dir().join(format!("logpipe-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("typo.toml");
        std::fs::write(&path, "[http]\nlisten_addr = \"127.0.0.1:1\"\n").expect("write");
        let err = Config::load(Some(&path), Vec::new()).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn burst_zero_means_limit() {
        let limits = RateLimitConfig {
            requests_per_minute: 60,
            burst: 0,
            ..RateLimitConfig::default()
        };
        assert_eq!(limits.effective_burst(), 60);
    }
}

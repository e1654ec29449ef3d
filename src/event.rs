//! Parsing and validation of `POST /api/logs/` request bodies.
//!
//! A body is one event object or a non-empty JSON array of them. [`parse_events`] checks every
//! field of every event and returns either all events, in request order, or every problem it
//! found, so a request is accepted whole or not at all. Level names from common logging
//! libraries map to OpenTelemetry severities, and fields outside the schema become attributes.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use uuid::Uuid;

/// Account and API key that sent an event, filled in by the HTTP layer from the API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub user_id: i64,
    pub api_key_id: i64,
}

/// OpenTelemetry severity ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Severity {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Fatal,
}

impl Severity {
    /// Returns the OpenTelemetry short name, such as `"WARN"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Trace => "TRACE",
            Severity::Debug => "DEBUG",
            Severity::Info => "INFO",
            Severity::Warn => "WARN",
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }

    /// Lowest SeverityNumber of the range. Each range spans four numbers.
    fn first_number(self) -> i32 {
        match self {
            Severity::Trace => 1,
            Severity::Debug => 5,
            Severity::Info => 9,
            Severity::Warn => 13,
            Severity::Error => 17,
            Severity::Fatal => 21,
        }
    }
}

/// A validated event, as published to Kafka (serde JSON) and stored in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Id chosen by the client, or a UUIDv7 generated while parsing.
    pub id: Uuid,
    pub user_id: i64,
    pub api_key_id: i64,
    pub service_name: String,
    /// Level text exactly as sent.
    pub level: String,
    /// Severity range of `level`.
    #[serde(rename = "severity_text")]
    pub severity: Severity,
    /// OpenTelemetry SeverityNumber, 1 to 24.
    pub severity_number: i32,
    pub message: String,
    /// Time of the event, or `received_at` when the client sent none.
    pub timestamp: DateTime<Utc>,
    /// Arrival time of the request.
    pub received_at: DateTime<Utc>,
    /// Flat values from the `attributes` object, plus every top-level field outside the
    /// schema under its own name with its value as sent (which may be nested).
    pub attributes: Map<String, Value>,
    /// W3C trace id the client sent with the event: 32 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// W3C span id the client sent with the event: 16 lowercase hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// One problem with one event of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position of the event in the request, 0 for a single top-level object.
    pub index: usize,
    /// Dotted path of the field, such as `attributes.pid` or `context.tags[2]`. Empty when
    /// the event itself is not a JSON object.
    pub field: String,
    /// Short lowercase phrase saying what is wrong.
    pub reason: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// Also returned for an empty body and for a top-level scalar or `null`.
    #[error("request body must be a JSON object or a non-empty array of objects")]
    Empty,
    #[error("{} invalid event(s)", .0.len())]
    Invalid(Vec<FieldError>),
}

/// Maximum size of `message`, in bytes of UTF-8.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Maximum length of `service_name`, in Unicode characters.
pub const MAX_SERVICE_NAME_CHARS: usize = 100;
/// Maximum length of an attribute key, in Unicode characters.
pub const MAX_ATTRIBUTE_KEY_CHARS: usize = 256;

/// Maximum number of characters of a client value echoed in a reason or field path.
const ECHO_MAX_CHARS: usize = 64;

/// PostgreSQL `text` and `jsonb` cannot store U+0000, so any string containing it is rejected.
const NUL_REASON: &str = "contains the NUL character U+0000, which cannot be stored";

const TIMESTAMP_FORMS: &str = "RFC 3339 or ISO 8601 text such as 2024-05-01T12:30:45Z or \
     2024-05-01 12:30:45.123+02:00, or a Unix epoch number in seconds, milliseconds, \
     microseconds or nanoseconds";

const ID: &str = "id";
const SERVICE_NAME: &str = "service_name";
const LOG_LEVEL: &str = "log_level";
const MESSAGE: &str = "message";
const TIMESTAMP: &str = "timestamp";
const ATTRIBUTES: &str = "attributes";
const TRACE_ID: &str = "trace_id";
const SPAN_ID: &str = "span_id";

/// Accepted level names in lowercase, with their severity and SeverityNumber.
///
/// Mappings follow appendix B of the OpenTelemetry log data model wherever it lists the name.
/// So syslog Critical is ERROR2, Alert ERROR3 and Notice INFO2, and java.util.logging FINE
/// and CONFIG are DEBUG2 and DEBUG3. Three choices differ from that table. The whole word
/// `critical` is FATAL because Python and .NET use it for their highest level, while syslog
/// writes its Critical as `crit`. `panic` is FATAL as the old syslog name of Emergency, not
/// ERROR3 as for Zap. FINER is TRACE2 rather than DEBUG, so that FINEST and
/// FINER, the two most verbose java.util.logging levels, both count as tracing.
const LEVELS: [(&str, Severity, i32); 37] = [
    // TRACE: log4j, .NET, Serilog `verbose`, logcat `v`, java.util.logging.
    ("trace", Severity::Trace, 1),
    ("trc", Severity::Trace, 1),
    ("verbose", Severity::Trace, 1),
    ("v", Severity::Trace, 1),
    ("finest", Severity::Trace, 1),
    ("finer", Severity::Trace, 2),
    // DEBUG: every family, plus java.util.logging FINE and CONFIG.
    ("debug", Severity::Debug, 5),
    ("dbg", Severity::Debug, 5),
    ("d", Severity::Debug, 5),
    ("fine", Severity::Debug, 6),
    ("config", Severity::Debug, 7),
    // INFO: syslog `informational` and `notice`, .NET `information`.
    ("info", Severity::Info, 9),
    ("inf", Severity::Info, 9),
    ("information", Severity::Info, 9),
    ("informational", Severity::Info, 9),
    ("i", Severity::Info, 9),
    ("notice", Severity::Info, 10),
    // WARN
    ("warn", Severity::Warn, 13),
    ("warning", Severity::Warn, 13),
    ("wrn", Severity::Warn, 13),
    ("w", Severity::Warn, 13),
    // ERROR: Python `exception`, java.util.logging SEVERE, syslog `crit` and `alert`.
    ("error", Severity::Error, 17),
    ("err", Severity::Error, 17),
    ("e", Severity::Error, 17),
    ("exception", Severity::Error, 17),
    ("severe", Severity::Error, 17),
    ("crit", Severity::Error, 18),
    ("alert", Severity::Error, 19),
    // FATAL: log4j, Serilog, Python and .NET `critical`, logcat `f`, `a` (assert) and `wtf`,
    // syslog `emerg`, `emergency` and `panic`.
    ("fatal", Severity::Fatal, 21),
    ("ftl", Severity::Fatal, 21),
    ("critical", Severity::Fatal, 21),
    ("f", Severity::Fatal, 21),
    ("a", Severity::Fatal, 21),
    ("wtf", Severity::Fatal, 21),
    ("emerg", Severity::Fatal, 21),
    ("emergency", Severity::Fatal, 21),
    ("panic", Severity::Fatal, 21),
];

/// Names of `LEVELS` in the same order.
static LEVEL_NAMES: [&str; LEVELS.len()] = level_names();

const fn level_names() -> [&'static str; LEVELS.len()] {
    let mut names = [""; LEVELS.len()];
    let mut i = 0;
    while i < LEVELS.len() {
        names[i] = LEVELS[i].0;
        i += 1;
    }
    names
}

/// Maximum length of a level text that is looked up, in bytes. The longest name,
/// `informational`, has 13, which leaves room for Go slog forms with long offsets such as
/// `error+1000000`.
const MAX_LEVEL_BYTES: usize = 24;

/// Returns the accepted level names, for error messages and docs.
pub fn accepted_levels() -> &'static [&'static str] {
    &LEVEL_NAMES
}

/// Maps a level text (case-insensitive, surrounding whitespace ignored) to its severity and
/// OpenTelemetry SeverityNumber, or `None` for an unknown level.
///
/// Besides [`accepted_levels`], Go slog's offset forms are accepted: `debug`, `info`, `warn`
/// or `error` followed by a signed offset, such as `INFO+2` or `ERROR-1`. The offset is
/// added to the range's first number and clamped to that range, so `DEBUG+4` is 8.
pub fn parse_level(text: &str) -> Option<(Severity, i32)> {
    let trimmed = text.trim().as_bytes();
    let mut buffer = [0u8; MAX_LEVEL_BYTES];
    let lowercase = buffer.get_mut(..trimmed.len())?;
    lowercase.copy_from_slice(trimmed);
    lowercase.make_ascii_lowercase();

    let exact_match = LEVELS
        .iter()
        .find(|(name, ..)| name.as_bytes() == &*lowercase);
    match exact_match {
        Some(&(_, severity, number)) => Some((severity, number)),
        None => parse_slog_level(lowercase),
    }
}

/// Parses a lowercase Go slog level with an offset, as Go's `slog.Level.String` writes a
/// level between the named ones (`debug-2`, `info+1`, `warn+3`) or above ERROR (`error+4`).
fn parse_slog_level(lowercase: &[u8]) -> Option<(Severity, i32)> {
    let sign_at = lowercase.iter().position(|&b| b == b'+' || b == b'-')?;
    let (name, offset) = lowercase.split_at(sign_at);
    let severity = match name {
        b"debug" => Severity::Debug,
        b"info" => Severity::Info,
        b"warn" => Severity::Warn,
        b"error" => Severity::Error,
        _ => return None,
    };

    // `offset` starts with its sign, which `parse` requires here. An offset too large for an
    // i64 fails to parse, so the level is unknown.
    let offset: i64 = std::str::from_utf8(offset).ok()?.parse().ok()?;
    let first = i64::from(severity.first_number());
    let number = (first + offset).clamp(first, first + 3);
    Some((severity, i32::try_from(number).ok()?))
}

/// Parses a request body (one event object or a JSON array of them) into validated events.
///
/// The result is all or nothing. If any event is invalid, it is [`ParseError::Invalid`] with
/// every problem of every event, by position in the request. A single top-level object is
/// index 0. An event without `id` gets a new UUIDv7, and one without `timestamp` gets
/// `received_at`.
///
/// # Errors
///
/// [`ParseError::InvalidJson`] when the body is not JSON, which includes invalid UTF-8 and
/// lone surrogate escapes. [`ParseError::Empty`] for an empty body, `[]`, or a top-level value
/// that is neither an object nor an array. [`ParseError::Invalid`] for invalid events.
pub fn parse_events(
    body: &[u8],
    owner: Owner,
    received_at: DateTime<Utc>,
) -> Result<Vec<Event>, ParseError> {
    let items = split_body(body)?;
    let mut events = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    let mut client_ids = HashMap::new();

    for (index, item) in items.into_iter().enumerate() {
        let mut report = Report {
            index,
            errors: &mut errors,
        };
        let fields = match item {
            Value::Object(fields) => fields,
            other => {
                let reason = format!("must be a JSON object, got {}", describe_type(&other));
                report.add(String::new(), reason);
                continue;
            }
        };
        let event = build_event(fields, owner, received_at, &mut client_ids, &mut report);
        events.extend(event);
    }

    if errors.is_empty() {
        Ok(events)
    } else {
        Err(ParseError::Invalid(errors))
    }
}

/// Parses the body and returns its events as JSON values, not yet checked.
fn split_body(body: &[u8]) -> Result<Vec<Value>, ParseError> {
    let json_whitespace = |byte: &u8| matches!(byte, b' ' | b'\t' | b'\n' | b'\r');
    if body.iter().all(json_whitespace) {
        return Err(ParseError::Empty);
    }

    let value = serde_json::from_slice(body).map_err(|e| ParseError::InvalidJson(e.to_string()))?;
    match value {
        Value::Object(fields) => Ok(vec![Value::Object(fields)]),
        Value::Array(items) if !items.is_empty() => Ok(items),
        _ => Err(ParseError::Empty),
    }
}

/// Collects the problems of one event into the list for the whole request.
struct Report<'a> {
    index: usize,
    errors: &'a mut Vec<FieldError>,
}

impl Report<'_> {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(FieldError {
            index: self.index,
            field: field.into(),
            reason: reason.into(),
        });
    }

    fn count(&self) -> usize {
        self.errors.len()
    }
}

/// Validates one event object and moves its values into an [`Event`]. Returns `None` when
/// any problem was reported.
fn build_event(
    mut fields: Map<String, Value>,
    owner: Owner,
    received_at: DateTime<Utc>,
    client_ids: &mut HashMap<Uuid, usize>,
    report: &mut Report<'_>,
) -> Option<Event> {
    let problems_before = report.count();
    let id = take_id(&mut fields, client_ids, report);
    let service_name = take_service_name(&mut fields, report);
    let level = take_level(&mut fields, report);
    let message = take_message(&mut fields, report);
    let timestamp = take_timestamp(&mut fields, received_at, report);
    let trace_id = take_trace_field(&mut fields, TRACE_ID, 32, report);
    let span_id = take_trace_field(&mut fields, SPAN_ID, 16, report);
    if matches!((&trace_id, &span_id), (Some(None), Some(Some(_)))) {
        report.add(SPAN_ID, "needs trace_id in the same event");
    }
    let mut attributes = take_attributes(&mut fields, report);
    merge_unknown_fields(fields, &mut attributes, report);

    if report.count() > problems_before {
        return None;
    }
    let (level, severity, severity_number) = level?;
    Some(Event {
        id: id?,
        user_id: owner.user_id,
        api_key_id: owner.api_key_id,
        service_name: service_name?,
        level,
        severity,
        severity_number,
        message: message?,
        timestamp: timestamp?,
        received_at,
        attributes,
        trace_id: trace_id?,
        span_id: span_id?,
    })
}

/// Removes a W3C trace context field (`trace_id` or `span_id`) of `digits` hex digits.
/// Returns `Some(None)` when it is absent or null, and `None` when it is invalid. The
/// all-zero id is invalid in W3C Trace Context, so it is rejected.
fn take_trace_field(
    fields: &mut Map<String, Value>,
    name: &str,
    digits: usize,
    report: &mut Report<'_>,
) -> Option<Option<String>> {
    let text = match fields.remove(name) {
        None | Some(Value::Null) => return Some(None),
        Some(Value::String(text)) => text,
        Some(other) => {
            let reason = format!(
                "must be a string of {digits} hex digits, got {}",
                describe_type(&other)
            );
            report.add(name, reason);
            return None;
        }
    };
    let hex = text.len() == digits && text.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex {
        report.add(name, format!("must be {digits} hex digits"));
        return None;
    }
    if text.bytes().all(|b| b == b'0') {
        report.add(name, "must not be all zeros");
        return None;
    }
    Some(Some(text.to_ascii_lowercase()))
}

/// Removes the client's `id`, or generates a UUIDv7 when there is none. A client id seen
/// earlier in the same request is reported on the later event.
fn take_id(
    fields: &mut Map<String, Value>,
    client_ids: &mut HashMap<Uuid, usize>,
    report: &mut Report<'_>,
) -> Option<Uuid> {
    let parsed = match fields.remove(ID) {
        None | Some(Value::Null) => return Some(Uuid::now_v7()),
        Some(Value::String(text)) => parse_client_id(&text),
        Some(other) => Err(format!(
            "must be a UUID string, got {}",
            describe_type(&other)
        )),
    };
    let id = parsed.map_err(|reason| report.add(ID, reason)).ok()?;

    match client_ids.entry(id) {
        Entry::Occupied(first) => {
            let reason = format!("duplicates the id of event {} in this request", first.get());
            report.add(ID, reason);
            None
        }
        Entry::Vacant(slot) => {
            slot.insert(report.index);
            Some(id)
        }
    }
}

/// Parses a client-chosen event id in the hyphenated form.
///
/// The nil and max UUIDs are rejected because they are placeholder values, and two different
/// events sent with one of them would be stored as one retried event.
fn parse_client_id(text: &str) -> Result<Uuid, String> {
    if text.contains('\0') {
        return Err(NUL_REASON.to_owned());
    }
    let parsed = if text.len() == 36 {
        Uuid::try_parse(text).ok()
    } else {
        None
    };
    match parsed {
        Some(id) if id.is_nil() || id.is_max() => Err("must not be the nil or max UUID".to_owned()),
        Some(id) => Ok(id),
        None => Err(format!(
            "invalid UUID {}, expected the hyphenated form such as \
             0190a5e4-7f3c-7b2a-9d1e-4c5f6a7b8c9d",
            echo(text)
        )),
    }
}

/// Removes a required string field. Reports it when missing, not a string or containing NUL.
fn take_required_string(
    fields: &mut Map<String, Value>,
    field: &'static str,
    report: &mut Report<'_>,
) -> Option<String> {
    match fields.remove(field) {
        Some(Value::String(text)) if text.contains('\0') => {
            report.add(field, NUL_REASON);
            None
        }
        Some(Value::String(text)) => Some(text),
        None => {
            report.add(field, "is required");
            None
        }
        Some(other) => {
            report.add(
                field,
                format!("must be a string, got {}", describe_type(&other)),
            );
            None
        }
    }
}

fn take_service_name(fields: &mut Map<String, Value>, report: &mut Report<'_>) -> Option<String> {
    let name = take_required_string(fields, SERVICE_NAME, report)?;

    // A name of at most MAX_SERVICE_NAME_CHARS bytes cannot have more characters, so only
    // longer names are counted.
    let too_long_chars = (name.len() > MAX_SERVICE_NAME_CHARS)
        .then(|| name.chars().count())
        .filter(|&chars| chars > MAX_SERVICE_NAME_CHARS);
    let reason = if name.is_empty() {
        "must not be empty".to_owned()
    } else if let Some(chars) = too_long_chars {
        format!("must be at most {MAX_SERVICE_NAME_CHARS} characters, got {chars}")
    } else if name.trim().is_empty() {
        "must not be only whitespace".to_owned()
    } else {
        return Some(name);
    };
    report.add(SERVICE_NAME, reason);
    None
}

/// Removes `log_level` and returns its text as sent, its severity and its SeverityNumber.
fn take_level(
    fields: &mut Map<String, Value>,
    report: &mut Report<'_>,
) -> Option<(String, Severity, i32)> {
    let text = take_required_string(fields, LOG_LEVEL, report)?;
    match parse_level(&text) {
        Some((severity, number)) => Some((text, severity, number)),
        None => {
            let reason = format!(
                "unknown level {}, expected one of {} (case-insensitive), or debug, info, warn \
                 or error with a Go slog offset such as info+2",
                echo(&text),
                accepted_levels().join(", ")
            );
            report.add(LOG_LEVEL, reason);
            None
        }
    }
}

fn take_message(fields: &mut Map<String, Value>, report: &mut Report<'_>) -> Option<String> {
    let message = take_required_string(fields, MESSAGE, report)?;
    if message.len() > MAX_MESSAGE_BYTES {
        let reason = format!(
            "must be at most {MAX_MESSAGE_BYTES} bytes of UTF-8, got {}",
            message.len()
        );
        report.add(MESSAGE, reason);
        return None;
    }
    Some(message)
}

/// Removes `timestamp` and converts it to UTC. Absent or `null` means `received_at`.
fn take_timestamp(
    fields: &mut Map<String, Value>,
    received_at: DateTime<Utc>,
    report: &mut Report<'_>,
) -> Option<DateTime<Utc>> {
    let parsed = match fields.remove(TIMESTAMP) {
        None | Some(Value::Null) => return Some(received_at),
        Some(Value::String(text)) => timestamp_from_text(&text),
        Some(Value::Number(number)) => timestamp_from_epoch(&number),
        Some(other) => Err(format!(
            "must be {TIMESTAMP_FORMS}, got {}",
            describe_type(&other)
        )),
    };
    parsed.map_err(|reason| report.add(TIMESTAMP, reason)).ok()
}

fn timestamp_from_text(text: &str) -> Result<DateTime<Utc>, String> {
    if text.contains('\0') {
        return Err(NUL_REASON.to_owned());
    }
    match parse_iso8601(text) {
        Some(time) if is_within_years(time) => Ok(time),
        Some(_) => Err(format!(
            "must be within the years 1 to 9999 in UTC, got {}",
            echo(text)
        )),
        None => Err(format!(
            "invalid timestamp {}, expected {TIMESTAMP_FORMS}",
            echo(text)
        )),
    }
}

/// Converts a Unix epoch number, whose unit follows from its magnitude (see
/// [`units_per_second`]).
fn timestamp_from_epoch(number: &Number) -> Result<DateTime<Utc>, String> {
    let time = match (number.as_u64(), number.as_f64()) {
        (Some(whole), _) => from_epoch_integer(whole),
        (None, Some(value)) if value < 0.0 => {
            return Err(format!("must not be negative, got {number}"));
        }
        (None, Some(value)) => from_epoch_float(value),
        (None, None) => None,
    };
    match time {
        Some(time) if is_within_years(time) => Ok(time),
        _ => Err(format!("must be within the years 1 to 9999, got {number}")),
    }
}

/// Returns how many units of an epoch number make one second. Below 1e11 (the year 5138 in
/// seconds) a number is seconds, below 1e14 milliseconds, below 1e17 microseconds, and
/// nanoseconds from there on.
fn units_per_second(magnitude: u64) -> u64 {
    match magnitude {
        0..100_000_000_000 => 1,
        100_000_000_000..100_000_000_000_000 => 1_000,
        100_000_000_000_000..100_000_000_000_000_000 => 1_000_000,
        _ => 1_000_000_000,
    }
}

fn from_epoch_integer(whole: u64) -> Option<DateTime<Utc>> {
    let per_second = units_per_second(whole);
    let seconds = i64::try_from(whole / per_second).ok()?;
    let nanos = (whole % per_second) * (1_000_000_000 / per_second);
    DateTime::from_timestamp(seconds, u32::try_from(nanos).ok()?)
}

/// Converts a non-negative fractional epoch number.
///
/// NOTE: the result is rounded to the microsecond. An f64 of seconds near the present has a
/// resolution of 2^-22 s (about 0.24 microseconds), so finer digits would be rounding noise.
fn from_epoch_float(value: f64) -> Option<DateTime<Utc>> {
    // `as u64` truncates and saturates, which keeps the comparisons with whole thresholds.
    let per_second = units_per_second(value as u64) as f64;
    let micros = (value * (1e6 / per_second)).round();
    // `as i64` saturates, and chrono rejects the saturated value as out of range.
    DateTime::from_timestamp_micros(micros as i64)
}

fn is_within_years(time: DateTime<Utc>) -> bool {
    (1..=9999).contains(&time.year())
}

/// Parses `YYYY-MM-DD`, alone (midnight UTC) or followed by `T`, `t` or a space and
/// `hh:mm:ss`, up to nine fraction digits after a `.`, and an optional offset `Z`, `z`,
/// `+hh:mm` or `+hhmm`. Without an offset the time is UTC. Second 60 is read as a leap
/// second, as RFC 3339 allows.
fn parse_iso8601(text: &str) -> Option<DateTime<Utc>> {
    let mut scanner = Scanner {
        rest: text.as_bytes(),
    };
    let date = scanner.date()?;
    if scanner.rest.is_empty() {
        return Some(date.and_time(NaiveTime::MIN).and_utc());
    }

    scanner.byte(b"Tt ")?;
    let time = scanner.time()?;
    let offset = scanner.offset()?;
    if !scanner.rest.is_empty() {
        return None;
    }
    let local = NaiveDateTime::new(date, time);
    Some(local.and_local_timezone(offset).single()?.to_utc())
}

/// Cursor over the bytes of a timestamp. Each method consumes what it parsed, and returns
/// `None` when the text does not match.
struct Scanner<'a> {
    rest: &'a [u8],
}

impl Scanner<'_> {
    fn byte(&mut self, allowed: &[u8]) -> Option<u8> {
        let (&first, rest) = self.rest.split_first()?;
        if !allowed.contains(&first) {
            return None;
        }
        self.rest = rest;
        Some(first)
    }

    fn digits(&mut self, count: usize) -> Option<u32> {
        let digits = self.rest.get(..count)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        self.rest = &self.rest[count..];
        Some(
            digits
                .iter()
                .fold(0, |value, d| value * 10 + u32::from(d - b'0')),
        )
    }

    fn date(&mut self) -> Option<NaiveDate> {
        let year = self.digits(4)?;
        self.byte(b"-")?;
        let month = self.digits(2)?;
        self.byte(b"-")?;
        let day = self.digits(2)?;
        NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)
    }

    fn time(&mut self) -> Option<NaiveTime> {
        let hour = self.digits(2)?;
        self.byte(b":")?;
        let minute = self.digits(2)?;
        self.byte(b":")?;
        let second = self.digits(2)?;
        let nanos = self.fraction()?;
        if second == 60 {
            // chrono represents a leap second as second 59 with nanoseconds past 1e9.
            NaiveTime::from_hms_nano_opt(hour, minute, 59, 1_000_000_000 + nanos)
        } else {
            NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        }
    }

    /// Parses an optional `.` and 1 to 9 digits into nanoseconds.
    fn fraction(&mut self) -> Option<u32> {
        if self.byte(b".").is_none() {
            return Some(0);
        }
        let count = self.rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=9).contains(&count) {
            return None;
        }
        let value = self.digits(count)?;
        Some(value * 10u32.pow(9 - count as u32))
    }

    /// Parses an optional offset. A missing one is UTC, and anything left over is rejected
    /// by the caller.
    fn offset(&mut self) -> Option<FixedOffset> {
        let sign = match self.byte(b"Zz+-") {
            None | Some(b'Z' | b'z') => return FixedOffset::east_opt(0),
            Some(sign) => sign,
        };
        let hours = self.digits(2)?;
        if self.rest.first() == Some(&b':') {
            self.rest = &self.rest[1..];
        }
        let minutes = self.digits(2)?;
        if minutes > 59 {
            return None;
        }
        let seconds = i32::try_from(hours * 3600 + minutes * 60).ok()?;
        // east_opt rejects offsets of 24 hours or more.
        FixedOffset::east_opt(if sign == b'-' { -seconds } else { seconds })
    }
}

/// Removes `attributes` and checks that it is an object of flat values with valid keys.
/// Returns the object even when it has problems, so that unknown fields can still be checked
/// against its keys.
fn take_attributes(fields: &mut Map<String, Value>, report: &mut Report<'_>) -> Map<String, Value> {
    let attributes = match fields.remove(ATTRIBUTES) {
        None | Some(Value::Null) => return Map::new(),
        Some(Value::Object(attributes)) => attributes,
        Some(other) => {
            let reason = format!("must be a JSON object, got {}", describe_type(&other));
            report.add(ATTRIBUTES, reason);
            return Map::new();
        }
    };

    for (key, value) in &attributes {
        if let Some(reason) = key_problem(key, "key") {
            report.add(attribute_path(key), reason);
        }
        match value {
            Value::String(text) if text.contains('\0') => {
                report.add(attribute_path(key), NUL_REASON);
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            other => {
                let reason = format!(
                    "must be a string, number or boolean, got {}",
                    describe_type(other)
                );
                report.add(attribute_path(key), reason);
            }
        }
    }
    attributes
}

/// Moves every top-level field outside the schema into `attributes` under its own name,
/// with its value as sent. A name that is also a key of `attributes` is reported.
fn merge_unknown_fields(
    unknown: Map<String, Value>,
    attributes: &mut Map<String, Value>,
    report: &mut Report<'_>,
) {
    for (name, value) in unknown {
        if let Some(reason) = key_problem(&name, "field name") {
            report.add(path_segment(&name), reason);
        }
        report_nested_nul(&value, &name, &mut Vec::new(), report);

        if attributes.contains_key(&name) {
            let reason = format!("conflicts with {}", attribute_path(&name));
            report.add(path_segment(&name), reason);
        } else {
            attributes.insert(name, value);
        }
    }
}

/// Returns what is wrong with an attribute key or a top-level field name, if anything.
fn key_problem(key: &str, noun: &str) -> Option<String> {
    if key.contains('\0') {
        return Some(format!("{noun} {NUL_REASON}"));
    }
    // A key of at most MAX_ATTRIBUTE_KEY_CHARS bytes cannot have more characters.
    if !key.is_empty() && key.len() <= MAX_ATTRIBUTE_KEY_CHARS {
        return None;
    }
    let chars = key.chars().count();
    if (1..=MAX_ATTRIBUTE_KEY_CHARS).contains(&chars) {
        return None;
    }
    Some(format!(
        "{noun} must be 1 to {MAX_ATTRIBUTE_KEY_CHARS} characters, got {chars}"
    ))
}

/// One step of the path to a value nested inside an unknown field.
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// Deepest nesting of arrays and objects accepted inside an unknown field. The consumers
/// decode the event inside an envelope with serde_json, whose limit is 128 levels, so a
/// value must stay well below that to be storable.
pub const MAX_NESTED_DEPTH: usize = 32;

/// Reports every string and object key inside `value` that contains NUL, and a value
/// nested deeper than `MAX_NESTED_DEPTH`.
fn report_nested_nul<'v>(
    value: &'v Value,
    name: &str,
    steps: &mut Vec<Step<'v>>,
    report: &mut Report<'_>,
) {
    let container = matches!(value, Value::Array(_) | Value::Object(_));
    if container && steps.len() >= MAX_NESTED_DEPTH {
        let reason = format!("is nested deeper than {MAX_NESTED_DEPTH} levels");
        report.add(nested_path(name, steps), reason);
        return;
    }
    match value {
        Value::String(text) if text.contains('\0') => {
            report.add(nested_path(name, steps), NUL_REASON);
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                steps.push(Step::Index(index));
                report_nested_nul(item, name, steps, report);
                steps.pop();
            }
        }
        Value::Object(members) => {
            for (key, item) in members {
                steps.push(Step::Key(key));
                if key.contains('\0') {
                    report.add(nested_path(name, steps), format!("key {NUL_REASON}"));
                }
                report_nested_nul(item, name, steps, report);
                steps.pop();
            }
        }
        _ => {}
    }
}

fn nested_path(name: &str, steps: &[Step<'_>]) -> String {
    let mut path = path_segment(name);
    for step in steps {
        match step {
            Step::Key(key) => {
                path.push('.');
                path.push_str(&path_segment(key));
            }
            Step::Index(index) => {
                let _ = write!(path, "[{index}]");
            }
        }
    }
    path
}

fn attribute_path(key: &str) -> String {
    format!("{ATTRIBUTES}.{}", path_segment(key))
}

/// Renders a key for a field path, with control characters escaped as `\u00XX` and at most
/// `ECHO_MAX_CHARS` characters, followed by `…` when cut.
fn path_segment(key: &str) -> String {
    let mut segment = String::with_capacity(key.len().min(4 * ECHO_MAX_CHARS));
    for (count, c) in key.chars().enumerate() {
        if count == ECHO_MAX_CHARS {
            segment.push('…');
            break;
        }
        if c.is_control() {
            let _ = write!(segment, "\\u{:04x}", u32::from(c));
        } else {
            segment.push(c);
        }
    }
    segment
}

/// Quotes a client value for a reason, escaped as a Rust string literal and cut after
/// `ECHO_MAX_CHARS` characters, with `…` marking the cut.
fn echo(text: &str) -> String {
    match text.char_indices().nth(ECHO_MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

fn describe_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Line 3 of the Loghub Apache sample (Zhu et al., ISSRE 2023) as the fixtures store it.
    const APACHE_LINE: &str = concat!(
        r#"{"service_name": "apache", "log_level": "notice", "#,
        r#""message": "jk2_init() Found child 6725 in scoreboard slot 10", "#,
        r#""timestamp": "2005-12-04T04:51:08.000Z", "attributes": {}}"#,
    );

    const OWNER: Owner = Owner {
        user_id: 7,
        api_key_id: 11,
    };

    fn received_at() -> DateTime<Utc> {
        utc("2024-05-01T12:00:00Z")
    }

    /// Parses RFC 3339 with chrono's own parser, to build expected values independently.
    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().to_utc()
    }

    fn parse(body: &str) -> Result<Vec<Event>, ParseError> {
        parse_events(body.as_bytes(), OWNER, received_at())
    }

    fn parse_value(body: &Value) -> Result<Vec<Event>, ParseError> {
        parse(&body.to_string())
    }

    /// A valid event with `field` set to `value`, or removed when `value` is `None`.
    fn event_with(field: &str, value: Option<Value>) -> Value {
        let mut event = json!({
            "service_name": "checkout",
            "log_level": "info",
            "message": "order placed",
        });
        let fields = event.as_object_mut().unwrap();
        match value {
            Some(value) => fields.insert(field.to_owned(), value),
            None => fields.remove(field),
        };
        event
    }

    fn parse_single(event: &Value) -> Event {
        let mut events = parse_value(event).unwrap();
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    fn field_errors(body: &Value) -> Vec<FieldError> {
        match parse_value(body) {
            Err(ParseError::Invalid(errors)) => errors,
            other => panic!("expected field errors for {body}, got {other:?}"),
        }
    }

    fn fields_of(errors: &[FieldError]) -> Vec<(usize, &str)> {
        errors.iter().map(|e| (e.index, e.field.as_str())).collect()
    }

    #[test]
    fn trace_context_fields_are_kept_lowercase() {
        let mut body = event_with("trace_id", Some(json!("4BF92F3577B34DA6A3CE929D0E0E4736")));
        body["span_id"] = json!("00F067AA0BA902B7");
        let event = parse_single(&body);
        assert_eq!(
            event.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(event.span_id.as_deref(), Some("00f067aa0ba902b7"));
        assert!(!event.attributes.contains_key("trace_id"));

        let absent = parse_single(&event_with("trace_id", None));
        assert_eq!((absent.trace_id, absent.span_id), (None, None));
    }

    #[test]
    fn invalid_trace_context_fields_are_rejected() {
        for (field, value) in [
            ("trace_id", json!("4bf92f3577b34da6")),
            ("trace_id", json!("00000000000000000000000000000000")),
            ("trace_id", json!("zzf92f3577b34da6a3ce929d0e0e4736")),
            ("trace_id", json!(42)),
            ("span_id", json!("00f067aa0ba902")),
            ("span_id", json!("0000000000000000")),
        ] {
            let mut body = event_with("trace_id", Some(json!("4bf92f3577b34da6a3ce929d0e0e4736")));
            body[field] = value.clone();
            let errors = field_errors(&body);
            assert_eq!(fields_of(&errors), [(0, field)], "{field} = {value}");
        }
        let errors = field_errors(&event_with("span_id", Some(json!("00f067aa0ba902b7"))));
        assert_eq!(fields_of(&errors), [(0, "span_id")]);
    }

    #[test]
    fn apache_sample_line_parses() {
        let events = parse(APACHE_LINE).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.service_name, "apache");
        assert_eq!(event.level, "notice");
        assert_eq!(event.severity, Severity::Info);
        assert_eq!(event.severity_number, 10);
        assert_eq!(
            event.message,
            "jk2_init() Found child 6725 in scoreboard slot 10"
        );
        assert_eq!(event.timestamp, utc("2005-12-04T04:51:08Z"));
        assert_eq!(event.received_at, received_at());
        assert_eq!(event.user_id, 7);
        assert_eq!(event.api_key_id, 11);
        assert!(event.attributes.is_empty());
        assert_eq!(event.id.get_version_num(), 7);
    }

    #[test]
    fn level_families_map_to_severity() {
        let cases: &[(&str, Severity, i32)] = &[
            // log4j and logback
            ("TRACE", Severity::Trace, 1),
            ("DEBUG", Severity::Debug, 5),
            ("INFO", Severity::Info, 9),
            ("WARN", Severity::Warn, 13),
            ("ERROR", Severity::Error, 17),
            ("FATAL", Severity::Fatal, 21),
            // syslog, following the OpenTelemetry appendix B
            ("emerg", Severity::Fatal, 21),
            ("emergency", Severity::Fatal, 21),
            ("panic", Severity::Fatal, 21),
            ("alert", Severity::Error, 19),
            ("crit", Severity::Error, 18),
            ("err", Severity::Error, 17),
            ("warning", Severity::Warn, 13),
            ("notice", Severity::Info, 10),
            ("informational", Severity::Info, 9),
            ("info", Severity::Info, 9),
            ("debug", Severity::Debug, 5),
            // Python logging
            ("CRITICAL", Severity::Fatal, 21),
            ("exception", Severity::Error, 17),
            ("WARNING", Severity::Warn, 13),
            // Go slog
            ("INFO+2", Severity::Info, 11),
            ("ERROR-1", Severity::Error, 17),
            ("DEBUG+4", Severity::Debug, 8),
            ("DEBUG-4", Severity::Debug, 5),
            ("WARN+3", Severity::Warn, 16),
            ("ERROR+4", Severity::Error, 20),
            ("INFO+0", Severity::Info, 9),
            // .NET and Serilog
            ("Trace", Severity::Trace, 1),
            ("Information", Severity::Info, 9),
            ("Critical", Severity::Fatal, 21),
            ("Verbose", Severity::Trace, 1),
            ("Fatal", Severity::Fatal, 21),
            // Android logcat
            ("V", Severity::Trace, 1),
            ("D", Severity::Debug, 5),
            ("I", Severity::Info, 9),
            ("W", Severity::Warn, 13),
            ("E", Severity::Error, 17),
            ("F", Severity::Fatal, 21),
            ("A", Severity::Fatal, 21),
            ("wtf", Severity::Fatal, 21),
            // java.util.logging
            ("FINEST", Severity::Trace, 1),
            ("FINER", Severity::Trace, 2),
            ("FINE", Severity::Debug, 6),
            ("CONFIG", Severity::Debug, 7),
            ("SEVERE", Severity::Error, 17),
            // abbreviations
            ("trc", Severity::Trace, 1),
            ("dbg", Severity::Debug, 5),
            ("inf", Severity::Info, 9),
            ("wrn", Severity::Warn, 13),
            ("ftl", Severity::Fatal, 21),
            // case and surrounding whitespace
            ("  Warn\t", Severity::Warn, 13),
            ("eRrOr", Severity::Error, 17),
        ];
        for &(text, severity, number) in cases {
            assert_eq!(
                parse_level(text),
                Some((severity, number)),
                "level {text:?}"
            );
        }
    }

    #[test]
    fn unknown_levels_rejected() {
        let cases = [
            "",
            "   ",
            "verbose2",
            "info2",
            "information+1",
            "trace+1",
            "info+",
            "info+-1",
            "info 2",
            "infoo",
            "error+99999999999999999999999",
            "İNFO",
        ];
        for text in cases {
            assert_eq!(parse_level(text), None, "level {text:?}");
        }
    }

    #[test]
    fn accepted_levels_all_parse() {
        assert!(accepted_levels().contains(&"notice"));
        for name in accepted_levels() {
            assert!(parse_level(name).is_some(), "level {name:?}");
        }
    }

    #[test]
    fn severity_short_names() {
        assert_eq!(Severity::Trace.as_str(), "TRACE");
        assert_eq!(Severity::Debug.as_str(), "DEBUG");
        assert_eq!(Severity::Info.as_str(), "INFO");
        assert_eq!(Severity::Warn.as_str(), "WARN");
        assert_eq!(Severity::Error.as_str(), "ERROR");
        assert_eq!(Severity::Fatal.as_str(), "FATAL");
    }

    #[test]
    fn unknown_level_reason_lists_names() {
        let errors = field_errors(&event_with("log_level", Some(json!("loud"))));
        assert_eq!(fields_of(&errors), [(0, "log_level")]);
        let reason = &errors[0].reason;
        assert!(reason.contains("\"loud\""), "{reason}");
        assert!(reason.contains(&accepted_levels().join(", ")), "{reason}");
    }

    #[test]
    fn level_must_be_string() {
        let errors = field_errors(&event_with("log_level", Some(json!(30))));
        assert_eq!(fields_of(&errors), [(0, "log_level")]);
        assert_eq!(errors[0].reason, "must be a string, got a number");
    }

    #[test]
    fn timestamp_text_forms_parse() {
        let cases = [
            ("2024-05-01T12:30:45Z", "2024-05-01T12:30:45Z"),
            ("2024-05-01t12:30:45z", "2024-05-01T12:30:45Z"),
            ("2024-05-01T12:30:45.123Z", "2024-05-01T12:30:45.123Z"),
            (
                "2024-05-01T12:30:45.123456789Z",
                "2024-05-01T12:30:45.123456789Z",
            ),
            ("2024-05-01T12:30:45+02:00", "2024-05-01T10:30:45Z"),
            ("2024-05-01T12:30:45+0200", "2024-05-01T10:30:45Z"),
            ("2024-05-01T12:30:45-05:30", "2024-05-01T18:00:45Z"),
            ("2024-05-01T12:30:45", "2024-05-01T12:30:45Z"),
            ("2024-05-01T12:30:45.5", "2024-05-01T12:30:45.5Z"),
            ("2024-05-01 12:30:45", "2024-05-01T12:30:45Z"),
            ("2024-05-01 12:30:45.123+02:00", "2024-05-01T10:30:45.123Z"),
            (
                "2024-05-01 12:30:45.000001-0100",
                "2024-05-01T13:30:45.000001Z",
            ),
            ("2024-05-01", "2024-05-01T00:00:00Z"),
            ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00Z"),
            ("9999-12-31T23:59:59Z", "9999-12-31T23:59:59Z"),
        ];
        for (text, expected) in cases {
            let event = parse_single(&event_with("timestamp", Some(json!(text))));
            assert_eq!(event.timestamp, utc(expected), "timestamp {text:?}");
        }
    }

    #[test]
    fn timestamp_leap_second_parses() {
        let event = parse_single(&event_with(
            "timestamp",
            Some(json!("2016-12-31T23:59:60Z")),
        ));
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_000_000_000)
            .unwrap()
            .and_utc();
        assert_eq!(event.timestamp, leap);
    }

    #[test]
    fn epoch_magnitudes_pick_unit() {
        let cases = [
            (json!(1_714_566_645_u64), "2024-05-01T12:30:45Z"),
            (json!(1_714_566_645.25), "2024-05-01T12:30:45.25Z"),
            (json!(1_714_566_645_123_u64), "2024-05-01T12:30:45.123Z"),
            (json!(1_714_566_645_123.5), "2024-05-01T12:30:45.1235Z"),
            (
                json!(1_714_566_645_123_456_u64),
                "2024-05-01T12:30:45.123456Z",
            ),
            (
                json!(1_714_566_645_123_456_789_u64),
                "2024-05-01T12:30:45.123456789Z",
            ),
            (json!(0), "1970-01-01T00:00:00Z"),
            (json!(99_999_999_999_u64), "5138-11-16T09:46:39Z"),
            (json!(100_000_000_000_u64), "1973-03-03T09:46:40Z"),
            (json!(u64::MAX), "2554-07-21T23:34:33.709551615Z"),
        ];
        for (number, expected) in cases {
            let event = parse_single(&event_with("timestamp", Some(number.clone())));
            assert_eq!(event.timestamp, utc(expected), "epoch {number}");
        }
    }

    #[test]
    fn missing_timestamp_uses_received_at() {
        let absent = parse_single(&event_with("timestamp", None));
        assert_eq!(absent.timestamp, received_at());
        let null = parse_single(&event_with("timestamp", Some(Value::Null)));
        assert_eq!(null.timestamp, received_at());
    }

    #[test]
    fn invalid_timestamps_rejected() {
        let cases = [
            (json!(-1), "must not be negative"),
            (json!(-0.5), "must not be negative"),
            (json!(1e300), "within the years 1 to 9999"),
            (json!("0000-12-31T23:00:00Z"), "within the years 1 to 9999"),
            (
                json!("0001-01-01T00:30:00+01:00"),
                "within the years 1 to 9999",
            ),
            (
                json!("9999-12-31T23:00:00-02:00"),
                "within the years 1 to 9999",
            ),
            (
                json!("yesterday"),
                "invalid timestamp \"yesterday\", expected RFC 3339",
            ),
            (json!("2024-13-01"), "invalid timestamp"),
            (json!("2024-02-30T00:00:00Z"), "invalid timestamp"),
            (json!("2024-05-01T24:00:00Z"), "invalid timestamp"),
            (json!("2024-05-01T12:30Z"), "invalid timestamp"),
            (json!("2024-05-01T12:30:45.Z"), "invalid timestamp"),
            (
                json!("2024-05-01T12:30:45.1234567891Z"),
                "invalid timestamp",
            ),
            (json!("2024-05-01T12:30:45+24:00"), "invalid timestamp"),
            (json!("2024-05-01T12:30:45+02:60"), "invalid timestamp"),
            (json!("2024-05-01T12:30:45Z "), "invalid timestamp"),
            (json!(" 2024-05-01"), "invalid timestamp"),
            (json!("2024-5-1"), "invalid timestamp"),
            (json!(""), "invalid timestamp"),
            (json!(true), "must be RFC 3339 or ISO 8601 text"),
            (json!({"seconds": 1}), "got an object"),
            (json!([1714566645]), "got an array"),
        ];
        for (value, expected) in cases {
            let errors = field_errors(&event_with("timestamp", Some(value.clone())));
            assert_eq!(fields_of(&errors), [(0, "timestamp")], "timestamp {value}");
            let reason = &errors[0].reason;
            assert!(reason.contains(expected), "timestamp {value}: {reason}");
        }
    }

    #[test]
    fn nul_rejected_in_every_string() {
        let cases = [
            (
                event_with("service_name", Some(json!("check\0out"))),
                "service_name",
            ),
            (event_with("log_level", Some(json!("info\0"))), "log_level"),
            (event_with("message", Some(json!("a\0b"))), "message"),
            (
                event_with("timestamp", Some(json!("2024-05-01\0"))),
                "timestamp",
            ),
            (event_with("id", Some(json!("\0"))), "id"),
            (
                event_with("attributes", Some(json!({"host": "a\0"}))),
                "attributes.host",
            ),
            (
                event_with("attributes", Some(json!({"ho\0st": "a"}))),
                "attributes.ho\\u0000st",
            ),
            (event_with("note", Some(json!("a\0"))), "note"),
            (event_with("no\0te", Some(json!("a"))), "no\\u0000te"),
            (
                event_with("ctx", Some(json!({"tags": ["ok", "b\0"]}))),
                "ctx.tags[1]",
            ),
            (
                event_with("ctx", Some(json!([{"k\0": 1}]))),
                "ctx[0].k\\u0000",
            ),
        ];
        for (event, field) in cases {
            let errors = field_errors(&event);
            assert_eq!(fields_of(&errors), [(0, field)], "event {event}");
            assert!(errors[0].reason.contains(NUL_REASON), "event {event}");
        }
    }

    #[test]
    fn invalid_utf8_is_invalid_json() {
        let body = b"{\"service_name\": \"a\xff\", \"log_level\": \"info\", \"message\": \"m\"}";
        let result = parse_events(body, OWNER, received_at());
        assert!(
            matches!(result, Err(ParseError::InvalidJson(_))),
            "{result:?}"
        );
    }

    #[test]
    fn lone_surrogate_is_invalid_json() {
        let body = r#"{"service_name": "a", "log_level": "info", "message": "\ud800"}"#;
        let result = parse(body);
        assert!(
            matches!(result, Err(ParseError::InvalidJson(_))),
            "{result:?}"
        );
    }

    #[test]
    fn malformed_json_is_invalid_json() {
        let result = parse(r#"{"service_name": "a","#);
        assert!(
            matches!(result, Err(ParseError::InvalidJson(_))),
            "{result:?}"
        );
    }

    #[test]
    fn non_event_bodies_are_empty() {
        for body in ["", " \n", "[]", "null", "42", "\"text\"", "true"] {
            assert_eq!(parse(body), Err(ParseError::Empty), "body {body:?}");
        }
    }

    #[test]
    fn array_keeps_request_order() {
        let body = json!([
            event_with("message", Some(json!("first"))),
            event_with("message", Some(json!("second"))),
            event_with("message", Some(json!("third"))),
        ]);
        let events = parse_value(&body).unwrap();
        let messages: Vec<&str> = events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, ["first", "second", "third"]);
    }

    #[test]
    fn batch_reports_every_problem() {
        let mut missing_message = event_with("message", None);
        missing_message["log_level"] = json!("loud");
        let body = json!([
            event_with("message", Some(json!("fine"))),
            missing_message,
            "not an event",
            event_with("service_name", Some(json!(""))),
        ]);
        let errors = field_errors(&body);
        let expected = [
            (1, "log_level"),
            (1, "message"),
            (2, ""),
            (3, "service_name"),
        ];
        assert_eq!(fields_of(&errors), expected);
        assert_eq!(errors[1].reason, "is required");
        assert_eq!(errors[2].reason, "must be a JSON object, got a string");
        assert_eq!(errors[3].reason, "must not be empty");
    }

    #[test]
    fn required_fields_checked() {
        let errors = field_errors(&json!({}));
        let expected = [(0, "service_name"), (0, "log_level"), (0, "message")];
        assert_eq!(fields_of(&errors), expected);
        assert!(errors.iter().all(|e| e.reason == "is required"));

        let errors = field_errors(&event_with("message", Some(Value::Null)));
        assert_eq!(errors[0].reason, "must be a string, got null");
    }

    #[test]
    fn service_name_limits_checked() {
        let at_limit = "é".repeat(MAX_SERVICE_NAME_CHARS);
        let event = parse_single(&event_with("service_name", Some(json!(at_limit))));
        assert_eq!(event.service_name, at_limit);

        let cases = [
            (json!(""), "must not be empty"),
            (json!(" \t "), "must not be only whitespace"),
            (
                json!("x".repeat(101)),
                "must be at most 100 characters, got 101",
            ),
            (json!(["checkout"]), "must be a string, got an array"),
        ];
        for (value, reason) in cases {
            let errors = field_errors(&event_with("service_name", Some(value.clone())));
            assert_eq!(fields_of(&errors), [(0, "service_name")], "name {value}");
            assert_eq!(errors[0].reason, reason, "name {value}");
        }
    }

    #[test]
    fn message_size_limit_checked() {
        let empty = parse_single(&event_with("message", Some(json!(""))));
        assert_eq!(empty.message, "");

        let at_limit = "m".repeat(MAX_MESSAGE_BYTES);
        let event = parse_single(&event_with("message", Some(json!(at_limit))));
        assert_eq!(event.message.len(), MAX_MESSAGE_BYTES);

        // 32,769 two-byte characters are 65,538 bytes.
        let over = "é".repeat(MAX_MESSAGE_BYTES / 2 + 1);
        let errors = field_errors(&event_with("message", Some(json!(over))));
        assert_eq!(fields_of(&errors), [(0, "message")]);
        assert_eq!(
            errors[0].reason,
            "must be at most 65536 bytes of UTF-8, got 65538"
        );
    }

    #[test]
    fn deep_unknown_field_rejected() {
        let mut nested = String::from("1");
        for _ in 0..MAX_NESTED_DEPTH + 1 {
            nested = format!("{{\"a\":{nested}}}");
        }
        let body =
            format!(r#"{{"service_name":"s","log_level":"info","message":"m","deep":{nested}}}"#);
        let result = parse_events(body.as_bytes(), OWNER_FOR_DEPTH, Utc::now());
        let Err(ParseError::Invalid(errors)) = result else {
            panic!("expected a field error, got {result:?}");
        };
        assert!(errors[0].field.starts_with("deep"), "{errors:?}");
        assert!(errors[0].reason.contains("nested deeper"), "{errors:?}");
    }

    const OWNER_FOR_DEPTH: Owner = Owner {
        user_id: 1,
        api_key_id: 1,
    };

    #[test]
    fn unknown_fields_kept_as_attributes() {
        let mut event = event_with("attributes", Some(json!({"pid": 4242, "tls": true})));
        event["host"] = json!("web-1");
        event["context"] = json!({"tags": ["a", "b"], "retry": null});
        event["sampled"] = Value::Null;

        let event = parse_single(&event);
        let expected = json!({
            "pid": 4242,
            "tls": true,
            "host": "web-1",
            "context": {"tags": ["a", "b"], "retry": null},
            "sampled": null,
        });
        assert_eq!(Value::Object(event.attributes), expected);
    }

    #[test]
    fn unknown_field_conflict_rejected() {
        let mut event = event_with("attributes", Some(json!({"host": "web-1"})));
        event["host"] = json!("web-2");
        let errors = field_errors(&event);
        assert_eq!(fields_of(&errors), [(0, "host")]);
        assert_eq!(errors[0].reason, "conflicts with attributes.host");
    }

    #[test]
    fn nested_attributes_rejected() {
        let attributes = json!({
            "ok": "v",
            "list": [1, 2],
            "map": {"a": 1},
            "none": null,
        });
        let errors = field_errors(&event_with("attributes", Some(attributes)));
        let expected = [
            (0, "attributes.list"),
            (0, "attributes.map"),
            (0, "attributes.none"),
        ];
        assert_eq!(fields_of(&errors), expected);
        assert_eq!(
            errors[0].reason,
            "must be a string, number or boolean, got an array"
        );
        assert_eq!(
            errors[1].reason,
            "must be a string, number or boolean, got an object"
        );
        assert_eq!(
            errors[2].reason,
            "must be a string, number or boolean, got null"
        );
    }

    #[test]
    fn attributes_must_be_object() {
        let errors = field_errors(&event_with("attributes", Some(json!(["pid"]))));
        assert_eq!(fields_of(&errors), [(0, "attributes")]);
        assert_eq!(errors[0].reason, "must be a JSON object, got an array");
    }

    #[test]
    fn attribute_key_length_checked() {
        let at_limit = "k".repeat(MAX_ATTRIBUTE_KEY_CHARS);
        let event = parse_single(&event_with(
            "attributes",
            Some(json!({ at_limit.clone(): 1 })),
        ));
        assert!(event.attributes.contains_key(&at_limit));

        let too_long = "k".repeat(MAX_ATTRIBUTE_KEY_CHARS + 1);
        let errors = field_errors(&event_with("attributes", Some(json!({ too_long: 1 }))));
        let field = format!("attributes.{}…", "k".repeat(ECHO_MAX_CHARS));
        assert_eq!(fields_of(&errors), [(0, field.as_str())]);
        assert_eq!(errors[0].reason, "key must be 1 to 256 characters, got 257");

        let errors = field_errors(&event_with("attributes", Some(json!({"": 1}))));
        assert_eq!(fields_of(&errors), [(0, "attributes.")]);
        assert_eq!(errors[0].reason, "key must be 1 to 256 characters, got 0");
    }

    #[test]
    fn client_id_used() {
        let id = "0190a5e4-7f3c-7b2a-9d1e-4c5f6a7b8c9d";
        let event = parse_single(&event_with("id", Some(json!(id))));
        assert_eq!(event.id.to_string(), id);

        let uppercase_v4 = "9F3A6C1E-2B4D-4E8F-A1B2-C3D4E5F60718";
        let event = parse_single(&event_with("id", Some(json!(uppercase_v4))));
        assert_eq!(event.id.to_string(), uppercase_v4.to_lowercase());
    }

    #[test]
    fn generated_ids_are_v7() {
        let body = json!([event_with("id", None), event_with("id", Some(Value::Null))]);
        let events = parse_value(&body).unwrap();
        assert_eq!(events[0].id.get_version_num(), 7);
        assert_eq!(events[1].id.get_version_num(), 7);
        assert_ne!(events[0].id, events[1].id);
    }

    #[test]
    fn duplicate_id_rejected() {
        let id = json!("0190a5e4-7f3c-7b2a-9d1e-4c5f6a7b8c9d");
        let body = json!([
            event_with("id", Some(id.clone())),
            event_with("id", None),
            event_with("id", Some(id)),
        ]);
        let errors = field_errors(&body);
        assert_eq!(fields_of(&errors), [(2, "id")]);
        assert_eq!(
            errors[0].reason,
            "duplicates the id of event 0 in this request"
        );
    }

    #[test]
    fn invalid_ids_rejected() {
        let cases = [
            (json!(42), "must be a UUID string, got a number"),
            (json!("order-42"), "invalid UUID \"order-42\""),
            (
                json!("0190a5e47f3c7b2a9d1e4c5f6a7b8c9d"),
                "expected the hyphenated form",
            ),
            (
                json!("{0190a5e4-7f3c-7b2a-9d1e-4c5f6a7b8c9d}"),
                "invalid UUID",
            ),
            (
                json!("00000000-0000-0000-0000-000000000000"),
                "nil or max UUID",
            ),
            (
                json!("ffffffff-ffff-ffff-ffff-ffffffffffff"),
                "nil or max UUID",
            ),
        ];
        for (value, expected) in cases {
            let errors = field_errors(&event_with("id", Some(value.clone())));
            assert_eq!(fields_of(&errors), [(0, "id")], "id {value}");
            assert!(
                errors[0].reason.contains(expected),
                "id {value}: {}",
                errors[0].reason
            );
        }
    }

    #[test]
    fn long_values_truncated_in_reasons() {
        let long_level = "x".repeat(500);
        let errors = field_errors(&event_with("log_level", Some(json!(long_level))));
        let quoted_prefix = format!("\"{}\"…", "x".repeat(ECHO_MAX_CHARS));
        let expected_start = format!("unknown level {quoted_prefix},");
        assert!(errors[0].reason.starts_with(&expected_start));
    }

    #[test]
    fn event_serde_round_trip() {
        let mut body = event_with("log_level", Some(json!("Warning")));
        body["attributes"] = json!({"pid": 4242});
        let event = parse_single(&body);

        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["severity_text"], "WARN");
        assert_eq!(json["severity_number"], 13);
        assert_eq!(json["level"], "Warning");
        assert!(json.get("severity").is_none());

        let decoded: Event = serde_json::from_value(json).unwrap();
        assert_eq!(decoded, event);
    }
}

//! gRPC's service config: the standard JSON document (`service_config.proto`, gRPC A6) that
//! sets, per method, a call's timeout, wait-for-ready, message size limits and retry policy,
//! and per pool the retry throttling.
//!
//! The document is read from a `serde_json::Value` by hand rather than by derived
//! deserializers: every check then knows the JSON path of the field it looks at, so a bad
//! document fails with `methodConfig[0].retryPolicy.maxAttempts: must be at least 2`, and
//! fields this pool does not know (`loadBalancingConfig`, `healthCheckConfig`...) are
//! accepted and ignored, as the spec requires.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tonic::Code;

use crate::error::Error;

/// Most attempts a retry or hedging policy gets, whatever it asks for: gRPC's limit (A6).
pub const MAX_POLICY_ATTEMPTS: u32 = 5;

/// The status code names as the spec writes them, in the order of their numbers.
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A status code's name as the spec writes it (`UNAVAILABLE`), for metric labels and logs.
pub(crate) fn code_name(code: Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

/// A parsed and checked service config: the method configs and the retry throttling.
///
/// Parse one with [`ServiceConfig::from_json`]; the pool takes it through the builder's
/// `service_config`. Method matching is the spec's: a config naming the exact service and
/// method, else one naming the service alone, else the one with an empty name (the default).
///
/// ```
/// use std::time::Duration;
/// let config = grpc_pool_core::ServiceConfig::from_json(r#"{
///   "methodConfig": [{
///     "name": [{ "service": "echo.Echo" }],
///     "timeout": "1.5s",
///     "retryPolicy": {
///       "maxAttempts": 3,
///       "initialBackoff": "0.1s",
///       "maxBackoff": "1s",
///       "backoffMultiplier": 2,
///       "retryableStatusCodes": ["UNAVAILABLE"]
///     }
///   }],
///   "retryThrottling": { "maxTokens": 10, "tokenRatio": 0.1 }
/// }"#).unwrap();
/// let method = config.method("echo.Echo", "UnaryEcho").unwrap();
/// assert_eq!(method.timeout, Some(Duration::from_millis(1500)));
/// assert_eq!(method.retry_policy.as_ref().unwrap().max_attempts, 3);
/// assert!(config.method("other.Service", "Call").is_none());
///
/// let err = grpc_pool_core::ServiceConfig::from_json(
///     r#"{"methodConfig": [{"retryPolicy": {"maxAttempts": 1}}]}"#,
/// ).unwrap_err();
/// assert!(err.to_string().contains("methodConfig[0].retryPolicy.maxAttempts: must be at least 2"));
/// ```
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// Every method config, in the document's order.
    pub method_configs: Vec<Arc<MethodConfig>>,
    /// The retry throttling, if the document sets one.
    pub retry_throttling: Option<RetryThrottling>,
    /// `service/method` to its config's index.
    exact: HashMap<String, usize>,
    /// `service` to the index of the config naming the service alone.
    services: HashMap<String, usize>,
    /// The config with the empty name.
    default: Option<usize>,
    /// Fields of the document that were ignored, each with why ([`ServiceConfig::ignored`]).
    ignored: Vec<String>,
}

/// One entry of `methodConfig`: what applies to the calls of the methods it names.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct MethodConfig {
    /// The methods it applies to (`name`).
    pub names: Vec<MethodName>,
    /// `timeout`: the call's deadline when it is shorter than the caller's own.
    pub timeout: Option<Duration>,
    /// `waitForReady`: gRPC's wait-for-ready for these calls, unless the caller sets
    /// [`WaitForReady`](crate::WaitForReady) itself.
    pub wait_for_ready: Option<bool>,
    /// `maxRequestMessageBytes`: a request message longer than this ends the call with
    /// `RESOURCE_EXHAUSTED` before it is sent whole.
    pub max_request_message_bytes: Option<u64>,
    /// `maxResponseMessageBytes`: a response message longer than this ends the call with
    /// `RESOURCE_EXHAUSTED`, its stream reset.
    pub max_response_message_bytes: Option<u64>,
    /// `retryPolicy`: calls that end with a retryable status are sent again.
    pub retry_policy: Option<RetryPolicy>,
    /// `hedgingPolicy`: copies of the call go out `hedgingDelay` apart until one answers.
    pub hedging_policy: Option<HedgingPolicy>,
}

/// One `name` of a method config. An empty `method` names every method of `service`; an
/// empty `service` (and `method`) names every method of every service: the default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct MethodName {
    /// The fully qualified service name, `echo.Echo`.
    pub service: String,
    /// The method name, `UnaryEcho`; empty for all of the service's methods.
    pub method: String,
}

/// `retryPolicy` (gRPC A6): a call that ends with one of `retryable_status_codes` before the
/// server committed to it (sent response headers) is sent again after a random backoff.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 2 to 5 (a document's larger value counts as 5).
    pub max_attempts: u32,
    /// The backoff bound before the first retry.
    pub initial_backoff: Duration,
    /// The largest backoff bound.
    pub max_backoff: Duration,
    /// Growth of the backoff bound per retry.
    pub backoff_multiplier: f64,
    /// The statuses that let a call be sent again.
    pub retryable_status_codes: Vec<Code>,
}

impl RetryPolicy {
    /// Whether a call ending with `code` may be sent again.
    pub fn is_retryable(&self, code: Code) -> bool {
        self.retryable_status_codes.contains(&code)
    }

    /// The bound of the backoff before retry `n` (1 for the first):
    /// `min(initial_backoff * backoff_multiplier^(n-1), max_backoff)`.
    pub fn backoff_bound(&self, n: u32) -> Duration {
        let exponent = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let bound = self.initial_backoff.as_secs_f64() * self.backoff_multiplier.powi(exponent);
        if bound.is_finite() && bound < self.max_backoff.as_secs_f64() {
            Duration::from_secs_f64(bound.max(0.0))
        } else {
            self.max_backoff
        }
    }

    /// The delay before retry `n`: uniformly random in `[0, backoff_bound(n))`.
    pub(crate) fn backoff(&self, n: u32) -> Duration {
        self.backoff_bound(n).mul_f64(fastrand::f64())
    }
}

/// `hedgingPolicy` (gRPC A6): the call goes out again every `hedging_delay`, to another
/// endpoint when there is one, up to `max_attempts` copies in all, until a copy's response
/// head comes; that copy wins and the others are reset (`CANCEL`). A copy that ends with one
/// of `non_fatal_status_codes` lets the others go on and the next copy go out at once; any
/// other status ends the call.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct HedgingPolicy {
    /// Copies in all, the first included: 2 to 5.
    pub max_attempts: u32,
    /// Time between copies.
    pub hedging_delay: Duration,
    /// Statuses of one copy that let the others go on.
    pub non_fatal_status_codes: Vec<Code>,
}

/// `retryThrottling` (gRPC A6): a token bucket per pool. It starts full at `max_tokens`; a
/// call's attempt that ends with a retryable status takes a token, a call that succeeds gives
/// back `token_ratio`; while the tokens are at or below half of `max_tokens`, failed calls
/// are not sent again.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryThrottling {
    /// The bucket's size, 1 to 1000.
    pub max_tokens: u32,
    /// Tokens a success gives back, above zero, kept to three decimal places.
    pub token_ratio: f64,
}

impl ServiceConfig {
    /// Parses and checks a service config document. Fails with the JSON path of the first
    /// bad field (`methodConfig[1].timeout: ...`); fields it does not know are ignored, and
    /// listed by [`ServiceConfig::ignored`].
    pub fn from_json(json: &str) -> Result<ServiceConfig, Error> {
        let value: Value = serde_json::from_str(json)
            .map_err(|e| Error::service_config("", &format!("not valid JSON: {e}")))?;
        let root = object(&value, "")?;
        let mut config = ServiceConfig::default();
        if let Some(list) = get(root, "methodConfig") {
            let Value::Array(list) = list else {
                return Err(wrong_type(list, "methodConfig", "an array"));
            };
            for (i, entry) in list.iter().enumerate() {
                let path = format!("methodConfig[{i}]");
                let method = method_config(entry, &path)?;
                config.add(method, &path)?;
            }
        }
        if let Some(throttling) = get(root, "retryThrottling") {
            config.retry_throttling = Some(retry_throttling(throttling, "retryThrottling")?);
        }
        ignored_fields(root, "", ROOT_FIELDS, &mut config.ignored);
        config.ignored.sort();
        Ok(config)
    }

    /// The document's fields that were ignored, each named by its JSON path with why: unknown
    /// to the service config (a typo such as `retrypolicy` leaves retries off, so the pool
    /// logs each of these as a warning at build) or not supported by the pool. The gRPC spec
    /// has clients ignore fields they do not know, so they do not fail the build.
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// Lists `method` under its names; a name already listed is an error (the spec's).
    fn add(&mut self, method: MethodConfig, path: &str) -> Result<(), Error> {
        let index = self.method_configs.len();
        for (i, name) in method.names.iter().enumerate() {
            let taken = if name.service.is_empty() {
                self.default.replace(index).is_some()
            } else if name.method.is_empty() {
                self.services.insert(name.service.clone(), index).is_some()
            } else {
                self.exact.insert(format!("{}/{}", name.service, name.method), index).is_some()
            };
            if taken {
                return Err(Error::service_config(
                    &format!("{path}.name[{i}]"),
                    "names a method that an earlier method config names already",
                ));
            }
        }
        self.method_configs.push(Arc::new(method));
        Ok(())
    }

    /// The config for `service`'s `method`: the exact name's, else the service's, else the
    /// default, else none.
    pub fn method(&self, service: &str, method: &str) -> Option<&Arc<MethodConfig>> {
        let exact = self.exact.get(&format!("{service}/{method}")).copied();
        self.pick(exact, service)
    }

    /// The config for a request path, `/echo.Echo/UnaryEcho`.
    pub(crate) fn for_path(&self, path: &str) -> Option<&Arc<MethodConfig>> {
        let name = path.strip_prefix('/').unwrap_or(path);
        let service = name.split_once('/').map_or(name, |(service, _)| service);
        self.pick(self.exact.get(name).copied(), service)
    }

    fn pick(&self, exact: Option<usize>, service: &str) -> Option<&Arc<MethodConfig>> {
        let index = exact.or_else(|| self.services.get(service).copied()).or(self.default)?;
        self.method_configs.get(index)
    }
}

// ----- reading the document, with the path of each field -----

/// The fields the pool reads, per object of the document; a field of an object missing here
/// is ignored, and said so.
const ROOT_FIELDS: &[&str] = &["methodConfig", "retryThrottling"];
const METHOD_FIELDS: &[&str] = &[
    "name",
    "timeout",
    "waitForReady",
    "maxRequestMessageBytes",
    "maxResponseMessageBytes",
    "retryPolicy",
    "hedgingPolicy",
];
const NAME_FIELDS: &[&str] = &["service", "method"];
const RETRY_FIELDS: &[&str] =
    &["maxAttempts", "initialBackoff", "maxBackoff", "backoffMultiplier", "retryableStatusCodes"];
const HEDGING_FIELDS: &[&str] = &["maxAttempts", "hedgingDelay", "nonFatalStatusCodes"];
const THROTTLING_FIELDS: &[&str] = &["maxTokens", "tokenRatio"];
/// Fields of the gRPC service config the pool does not act on, and why.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("loadBalancingPolicy", "the pool picks endpoints and connections itself"),
    ("loadBalancingConfig", "the pool picks endpoints and connections itself"),
    ("healthCheckConfig", "set health checks with `health_checks` / `[health_checks]`"),
    ("perAttemptRecvTimeout", "not supported; the call's deadline bounds every attempt"),
];

/// Notes in `out` every field of `object` (at `path`) not in `known`, and goes down into the
/// known ones that hold objects. Runs on a document already checked, so types are right.
fn ignored_fields(object: &Map<String, Value>, path: &str, known: &[&str], out: &mut Vec<String>) {
    for (name, value) in object {
        let field = join(path, name);
        if !known.contains(&name.as_str()) {
            let why = match UNSUPPORTED.iter().find(|(n, _)| n == name) {
                Some((_, why)) => format!("not supported by grpc-pool ({why})"),
                None => match known.iter().find(|k| same_but_spelling(k, name)) {
                    Some(meant) => format!("unknown field; did you mean `{meant}`?"),
                    None => format!("unknown field; the fields here are {}", known.join(", ")),
                },
            };
            out.push(format!("`{field}`: {why}"));
            continue;
        }
        let inner = match name.as_str() {
            "methodConfig" => METHOD_FIELDS,
            "name" => NAME_FIELDS,
            "retryPolicy" => RETRY_FIELDS,
            "hedgingPolicy" => HEDGING_FIELDS,
            "retryThrottling" => THROTTLING_FIELDS,
            _ => continue,
        };
        match value {
            Value::Object(map) => ignored_fields(map, &field, inner, out),
            Value::Array(list) => {
                for (i, entry) in list.iter().enumerate() {
                    if let Value::Object(map) = entry {
                        ignored_fields(map, &format!("{field}[{i}]"), inner, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Whether two field names differ only in case and underscores (`retrypolicy`,
/// `retry_policy` and `retryPolicy`).
fn same_but_spelling(a: &str, b: &str) -> bool {
    let plain = |s: &str| s.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect::<String>();
    plain(a) == plain(b)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(value: &Value, path: &str, expected: &str) -> Error {
    Error::service_config(path, &format!("expected {expected}, found {}", kind(value)))
}

fn object<'v>(value: &'v Value, path: &str) -> Result<&'v Map<String, Value>, Error> {
    match value {
        Value::Object(map) => Ok(map),
        other => Err(wrong_type(other, path, "an object")),
    }
}

/// A field of `object`; `null` counts as absent, as in protobuf's JSON mapping.
fn get<'v>(object: &'v Map<String, Value>, name: &str) -> Option<&'v Value> {
    object.get(name).filter(|v| !v.is_null())
}

fn required<'v>(object: &'v Map<String, Value>, name: &str, path: &str) -> Result<&'v Value, Error> {
    get(object, name).ok_or_else(|| Error::service_config(&join(path, name), "is missing"))
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

/// A non-negative integer: a JSON number, or a string of digits (protobuf's JSON mapping
/// writes 64-bit integers as strings).
fn integer(value: &Value, path: &str) -> Result<u64, Error> {
    let found = match value {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19).map(|f| f as u64)
        }),
        Value::String(s) => s.parse::<u64>().ok(),
        other => return Err(wrong_type(other, path, "a whole number")),
    };
    found.ok_or_else(|| Error::service_config(path, &format!("`{value}` is not a whole number of 0 or more")))
}

fn number(value: &Value, path: &str) -> Result<f64, Error> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| Error::service_config(path, "is not a number")),
        other => Err(wrong_type(other, path, "a number")),
    }
}

fn boolean(value: &Value, path: &str) -> Result<bool, Error> {
    match value {
        Value::Bool(b) => Ok(*b),
        other => Err(wrong_type(other, path, "true or false")),
    }
}

fn string<'v>(value: &'v Value, path: &str) -> Result<&'v str, Error> {
    match value {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(other, path, "a string")),
    }
}

/// A duration as protobuf's JSON mapping writes it: seconds, up to nine decimals, and `s`
/// (`"0.2s"`, `"30s"`).
fn duration(value: &Value, path: &str) -> Result<Duration, Error> {
    let text = match value {
        Value::String(s) => s,
        other => return Err(wrong_type(other, path, "a duration string such as \"0.2s\"")),
    };
    if text.starts_with('-') {
        return Err(Error::service_config(path, &format!("`{text}` is negative")));
    }
    parse_duration(text).ok_or_else(|| {
        Error::service_config(
            path,
            &format!("`{text}` is not a duration: write seconds and `s`, such as \"0.2s\" or \"30s\""),
        )
    })
}

fn parse_duration(text: &str) -> Option<Duration> {
    let body = text.strip_suffix('s')?;
    let (whole, fraction) = match body.split_once('.') {
        Some((whole, fraction)) if !fraction.is_empty() => (whole, fraction),
        Some(_) => return None,
        None => (body, ""),
    };
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || fraction.len() > 9 || !digits(fraction) {
        return None;
    }
    let seconds: u64 = whole.parse().ok()?;
    let nanos: u32 = if fraction.is_empty() { 0 } else { format!("{fraction:0<9}").parse().ok()? };
    Some(Duration::new(seconds, nanos))
}

fn positive_duration(object: &Map<String, Value>, name: &str, path: &str) -> Result<Duration, Error> {
    let field_path = join(path, name);
    let value = duration(required(object, name, path)?, &field_path)?;
    if value.is_zero() {
        return Err(Error::service_config(&field_path, "must be above zero"));
    }
    Ok(value)
}

/// A status code, by name (`"UNAVAILABLE"`) or number (`14`).
fn code(value: &Value, path: &str) -> Result<Code, Error> {
    let number = match value {
        Value::String(name) => {
            CODE_NAMES.iter().position(|n| n.eq_ignore_ascii_case(name)).ok_or_else(|| {
                Error::service_config(
                    path,
                    &format!("`{name}` is not a gRPC status code (such as \"UNAVAILABLE\")"),
                )
            })?
        }
        Value::Number(n) => {
            n.as_u64().and_then(|n| usize::try_from(n).ok()).filter(|n| *n < CODE_NAMES.len()).ok_or_else(
                || Error::service_config(path, &format!("{n} is not a gRPC status code (0 to 16)")),
            )?
        }
        other => return Err(wrong_type(other, path, "a status code name or number")),
    };
    Ok(Code::from_i32(i32::try_from(number).unwrap_or(2)))
}

fn codes(
    object: &Map<String, Value>,
    name: &str,
    path: &str,
    must_have_one: bool,
) -> Result<Vec<Code>, Error> {
    let path = join(path, name);
    let list = match get(object, name) {
        None if must_have_one => return Err(Error::service_config(&path, "is missing")),
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(wrong_type(other, &path, "an array of status codes")),
    };
    if must_have_one && list.is_empty() {
        return Err(Error::service_config(&path, "must name at least one status code"));
    }
    let mut found = Vec::with_capacity(list.len());
    for (i, value) in list.iter().enumerate() {
        let code = code(value, &format!("{path}[{i}]"))?;
        if !found.contains(&code) {
            found.push(code);
        }
    }
    Ok(found)
}

fn attempts(object: &Map<String, Value>, path: &str) -> Result<u32, Error> {
    let field_path = join(path, "maxAttempts");
    let n = integer(required(object, "maxAttempts", path)?, &field_path)?;
    if n < 2 {
        return Err(Error::service_config(&field_path, "must be at least 2"));
    }
    Ok(u32::try_from(n).unwrap_or(u32::MAX).min(MAX_POLICY_ATTEMPTS))
}

fn method_config(value: &Value, path: &str) -> Result<MethodConfig, Error> {
    let object = object(value, path)?;
    let mut config = MethodConfig::default();
    if let Some(names) = get(object, "name") {
        let names_path = join(path, "name");
        let Value::Array(names) = names else {
            return Err(wrong_type(names, &names_path, "an array of {service, method}"));
        };
        for (i, name) in names.iter().enumerate() {
            let name_path = format!("{names_path}[{i}]");
            let name = self::object(name, &name_path)?;
            let field = |field: &str| -> Result<String, Error> {
                get(name, field)
                    .map(|v| string(v, &join(&name_path, field)).map(str::to_owned))
                    .unwrap_or(Ok(String::new()))
            };
            let (service, method) = (field("service")?, field("method")?);
            if service.is_empty() && !method.is_empty() {
                return Err(Error::service_config(
                    &join(&name_path, "method"),
                    "is set while `service` is empty (an empty service names the default for all methods)",
                ));
            }
            config.names.push(MethodName { service, method });
        }
    }
    if let Some(timeout) = get(object, "timeout") {
        let timeout_path = join(path, "timeout");
        let timeout = duration(timeout, &timeout_path)?;
        if timeout.is_zero() {
            return Err(Error::service_config(&timeout_path, "must be above zero"));
        }
        config.timeout = Some(timeout);
    }
    if let Some(wait) = get(object, "waitForReady") {
        config.wait_for_ready = Some(boolean(wait, &join(path, "waitForReady"))?);
    }
    for (name, slot) in [
        ("maxRequestMessageBytes", &mut config.max_request_message_bytes),
        ("maxResponseMessageBytes", &mut config.max_response_message_bytes),
    ] {
        if let Some(value) = get(object, name) {
            *slot = Some(integer(value, &join(path, name))?);
        }
    }
    if let Some(policy) = get(object, "retryPolicy") {
        config.retry_policy = Some(retry_policy(policy, &join(path, "retryPolicy"))?);
    }
    if let Some(policy) = get(object, "hedgingPolicy") {
        let policy_path = join(path, "hedgingPolicy");
        if config.retry_policy.is_some() {
            return Err(Error::service_config(
                &policy_path,
                "is set beside retryPolicy; a method config may have one or the other",
            ));
        }
        config.hedging_policy = Some(hedging_policy(policy, &policy_path)?);
    }
    Ok(config)
}

fn retry_policy(value: &Value, path: &str) -> Result<RetryPolicy, Error> {
    let object = object(value, path)?;
    let max_attempts = attempts(object, path)?;
    let initial_backoff = positive_duration(object, "initialBackoff", path)?;
    let max_backoff = positive_duration(object, "maxBackoff", path)?;
    let multiplier_path = join(path, "backoffMultiplier");
    let backoff_multiplier = number(required(object, "backoffMultiplier", path)?, &multiplier_path)?;
    if !(backoff_multiplier > 0.0 && backoff_multiplier.is_finite()) {
        return Err(Error::service_config(&multiplier_path, "must be above zero"));
    }
    let retryable_status_codes = codes(object, "retryableStatusCodes", path, true)?;
    Ok(RetryPolicy { max_attempts, initial_backoff, max_backoff, backoff_multiplier, retryable_status_codes })
}

fn hedging_policy(value: &Value, path: &str) -> Result<HedgingPolicy, Error> {
    let object = object(value, path)?;
    let max_attempts = attempts(object, path)?;
    let hedging_delay = match get(object, "hedgingDelay") {
        Some(delay) => duration(delay, &join(path, "hedgingDelay"))?,
        None => Duration::ZERO,
    };
    let non_fatal_status_codes = codes(object, "nonFatalStatusCodes", path, false)?;
    Ok(HedgingPolicy { max_attempts, hedging_delay, non_fatal_status_codes })
}

fn retry_throttling(value: &Value, path: &str) -> Result<RetryThrottling, Error> {
    let object = object(value, path)?;
    let tokens_path = join(path, "maxTokens");
    let max_tokens = integer(required(object, "maxTokens", path)?, &tokens_path)?;
    if !(1..=1000).contains(&max_tokens) {
        return Err(Error::service_config(&tokens_path, "must be above 0 and at most 1000"));
    }
    let ratio_path = join(path, "tokenRatio");
    let token_ratio = number(required(object, "tokenRatio", path)?, &ratio_path)?;
    if !(token_ratio > 0.0 && token_ratio.is_finite()) {
        return Err(Error::service_config(&ratio_path, "must be above zero"));
    }
    if (token_ratio * 1000.0).round() < 1.0 {
        return Err(Error::service_config(
            &ratio_path,
            "must be at least 0.001 (three decimal places are kept)",
        ));
    }
    let max_tokens = u32::try_from(max_tokens).unwrap_or(1000);
    Ok(RetryThrottling { max_tokens, token_ratio: (token_ratio * 1000.0).round() / 1000.0 })
}

// ----- the throttle -----

/// The retry throttle of one pool (A6's token bucket), in thousandths of a token so that a
/// `tokenRatio` of three decimals adds up exactly.
#[derive(Debug)]
pub(crate) struct RetryTokens {
    milli: AtomicU64,
    max: u64,
    ratio: u64,
}

impl RetryTokens {
    pub(crate) fn new(settings: &RetryThrottling) -> RetryTokens {
        let max = u64::from(settings.max_tokens) * 1000;
        // Checked at parse: at least 0.001, at most whatever a finite f64 holds.
        let ratio = (settings.token_ratio * 1000.0).round().clamp(1.0, 1e15) as u64;
        RetryTokens { milli: AtomicU64::new(max), max, ratio }
    }

    /// An attempt failed with a retryable status: takes a token. Whether retries are still
    /// allowed (the tokens left are above half of the maximum).
    pub(crate) fn failure(&self) -> bool {
        let before = self
            .milli
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some(t.saturating_sub(1000)))
            .unwrap_or_else(|t| t);
        before.saturating_sub(1000) > self.max / 2
    }

    /// A call succeeded: gives back `tokenRatio`, up to the maximum.
    pub(crate) fn success(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| Some((t + self.ratio).min(self.max)));
    }

    /// Whether retries and hedges may go out now: the tokens are above half of the maximum.
    pub(crate) fn allows(&self) -> bool {
        self.milli.load(Ordering::Acquire) > self.max / 2
    }

    /// The tokens now.
    pub(crate) fn tokens(&self) -> f64 {
        self.milli.load(Ordering::Acquire) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_fields_are_named_with_why() {
        let config = ServiceConfig::from_json(
            r#"{
              "methodConfig": [{
                "name": [{ "service": "echo.Echo", "methd": "UnaryEcho" }],
                "retrypolicy": { "maxAttempts": 3 },
                "hedgingPolicy": { "maxAttempts": 2, "hedgingDelay": "0.1s", "extra": 1 }
              }],
              "loadBalancingConfig": [{ "round_robin": {} }],
              "retry_throttling": { "maxTokens": 10 }
            }"#,
        )
        .unwrap();
        assert_eq!(
            config.ignored(),
            [
                "`loadBalancingConfig`: not supported by grpc-pool (the pool picks endpoints and connections itself)",
                "`methodConfig[0].hedgingPolicy.extra`: unknown field; the fields here are maxAttempts, hedgingDelay, nonFatalStatusCodes",
                "`methodConfig[0].name[0].methd`: unknown field; the fields here are service, method",
                "`methodConfig[0].retrypolicy`: unknown field; did you mean `retryPolicy`?",
                "`retry_throttling`: unknown field; did you mean `retryThrottling`?",
            ]
        );
        assert!(
            config.method("echo.Echo", "Other").unwrap().retry_policy.is_none(),
            "the typo left retries off"
        );
        assert!(ServiceConfig::from_json(r#"{"methodConfig": [{"name": [{}], "timeout": "1s"}]}"#)
            .unwrap()
            .ignored()
            .is_empty());
    }

    fn error(json: &str) -> String {
        ServiceConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn reads_the_spec_fields_and_ignores_unknown_ones() {
        let config = ServiceConfig::from_json(
            r#"{
              "loadBalancingConfig": [{"round_robin": {}}],
              "methodConfig": [
                {"name": [{"service": "a.A", "method": "M"}], "timeout": "0.25s", "waitForReady": true,
                 "maxRequestMessageBytes": "1024", "maxResponseMessageBytes": 2048, "somethingNew": 1},
                {"name": [{"service": "a.A"}], "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s",
                 "maxBackoff": "2s", "backoffMultiplier": 1.5, "retryableStatusCodes": ["UNAVAILABLE", 4, "aborted"]}},
                {"name": [{}], "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.05s"}}
              ],
              "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1234}
            }"#,
        )
        .unwrap();
        let exact = config.method("a.A", "M").unwrap();
        assert_eq!(exact.timeout, Some(Duration::from_millis(250)));
        assert_eq!(exact.wait_for_ready, Some(true));
        assert_eq!(exact.max_request_message_bytes, Some(1024));
        assert_eq!(exact.max_response_message_bytes, Some(2048));
        let service = config.for_path("/a.A/Other").unwrap();
        let policy = service.retry_policy.as_ref().unwrap();
        assert_eq!(policy.max_attempts, 5, "values above 5 count as 5");
        assert_eq!(policy.retryable_status_codes, [Code::Unavailable, Code::DeadlineExceeded, Code::Aborted]);
        let default = config.method("b.B", "X").unwrap();
        assert_eq!(default.hedging_policy.as_ref().unwrap().hedging_delay, Duration::from_millis(50));
        assert_eq!(config.retry_throttling.unwrap().token_ratio, 0.123);
    }

    #[test]
    fn matching_is_exact_then_service_then_default() {
        let config = ServiceConfig::from_json(
            r#"{"methodConfig": [
                {"name": [{"service": "s.S", "method": "A"}], "timeout": "1s"},
                {"name": [{"service": "s.S", "method": ""}], "timeout": "2s"}
            ]}"#,
        )
        .unwrap();
        let timeout = |path: &str| config.for_path(path).and_then(|m| m.timeout);
        assert_eq!(timeout("/s.S/A"), Some(Duration::from_secs(1)));
        assert_eq!(timeout("/s.S/B"), Some(Duration::from_secs(2)));
        assert_eq!(timeout("/t.T/A"), None);
    }

    #[test]
    fn durations_as_protobuf_writes_them() {
        for (text, expected) in [
            ("0.2s", Some(Duration::from_millis(200))),
            ("30s", Some(Duration::from_secs(30))),
            ("1.000000001s", Some(Duration::new(1, 1))),
            ("1.s", None),
            (".5s", None),
            ("1", None),
            ("1m", None),
            ("1.0000000001s", None),
            ("0x1s", None),
        ] {
            assert_eq!(parse_duration(text), expected, "{text}");
        }
    }

    #[test]
    fn every_invalid_field_is_named_by_its_json_path() {
        let retry = |body: &str| format!(r#"{{"methodConfig": [{{}}, {{"retryPolicy": {body}}}]}}"#);
        let ok = r#""initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]"#;
        let cases = [
            (retry(&format!(r#"{{"maxAttempts": 1, {ok}}}"#)), "methodConfig[1].retryPolicy.maxAttempts: must be at least 2"),
            (retry(&format!(r#"{{"maxAttempts": "x", {ok}}}"#)), "methodConfig[1].retryPolicy.maxAttempts: `\"x\"` is not a whole number"),
            (retry(r#"{"maxAttempts": 2}"#), "methodConfig[1].retryPolicy.initialBackoff: is missing"),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "0s", "maxBackoff": "1s"}"#),
                "methodConfig[1].retryPolicy.initialBackoff: must be above zero",
            ),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "-1s"}"#),
                "methodConfig[1].retryPolicy.maxBackoff: `-1s` is negative",
            ),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 0}"#),
                "methodConfig[1].retryPolicy.backoffMultiplier: must be above zero",
            ),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": []}"#),
                "methodConfig[1].retryPolicy.retryableStatusCodes: must name at least one status code",
            ),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "NOPE"]}"#),
                "methodConfig[1].retryPolicy.retryableStatusCodes[1]: `NOPE` is not a gRPC status code",
            ),
            (
                retry(r#"{"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": [17]}"#),
                "methodConfig[1].retryPolicy.retryableStatusCodes[0]: 17 is not a gRPC status code",
            ),
            (r#"{"methodConfig": [{"timeout": 5}]}"#.to_owned(), "methodConfig[0].timeout: expected a duration string"),
            (r#"{"methodConfig": [{"timeout": "5"}]}"#.to_owned(), "methodConfig[0].timeout: `5` is not a duration"),
            (r#"{"methodConfig": [{"waitForReady": "yes"}]}"#.to_owned(), "methodConfig[0].waitForReady: expected true or false"),
            (r#"{"methodConfig": [{"name": [{"method": "M"}]}]}"#.to_owned(), "methodConfig[0].name[0].method: is set while `service` is empty"),
            (
                r#"{"methodConfig": [{"name": [{"service": "s"}]}, {"name": [{"service": "t"}, {"service": "s"}]}]}"#.to_owned(),
                "methodConfig[1].name[1]: names a method that an earlier method config names already",
            ),
            (
                format!(r#"{{"methodConfig": [{{"retryPolicy": {{"maxAttempts": 2, {ok}}}, "hedgingPolicy": {{"maxAttempts": 2}}}}]}}"#),
                "methodConfig[0].hedgingPolicy: is set beside retryPolicy",
            ),
            (r#"{"retryThrottling": {"maxTokens": 0, "tokenRatio": 1}}"#.to_owned(), "retryThrottling.maxTokens: must be above 0 and at most 1000"),
            (r#"{"retryThrottling": {"maxTokens": 1001, "tokenRatio": 1}}"#.to_owned(), "retryThrottling.maxTokens: must be above 0 and at most 1000"),
            (r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0}}"#.to_owned(), "retryThrottling.tokenRatio: must be above zero"),
            (r#"{"retryThrottling": {"maxTokens": 10, "tokenRatio": 0.0001}}"#.to_owned(), "retryThrottling.tokenRatio: must be at least 0.001"),
            (r#"{"retryThrottling": {"maxTokens": 10}}"#.to_owned(), "retryThrottling.tokenRatio: is missing"),
            (r#"{"methodConfig": {}}"#.to_owned(), "methodConfig: expected an array, found an object"),
            ("[]".to_owned(), "invalid service config: expected an object, found an array"),
            ("{".to_owned(), "invalid service config: not valid JSON"),
        ];
        for (json, expected) in cases {
            let message = error(&json);
            assert!(message.contains(expected), "{json}\n  gave: {message}\n  wanted: {expected}");
        }
    }

    #[test]
    fn the_throttle_follows_a6_arithmetic() {
        let tokens = RetryTokens::new(&RetryThrottling { max_tokens: 10, token_ratio: 0.5 });
        // 10 -> 9, 8, 7, 6: above 5, retries allowed; 5 is not above half.
        assert!((0..4).all(|_| tokens.failure()));
        assert!(!tokens.failure());
        assert_eq!(tokens.tokens(), 5.0);
        tokens.success();
        assert_eq!(tokens.tokens(), 5.5);
        assert!(!tokens.failure(), "4.5 is below half");
        (0..20).for_each(|_| tokens.success());
        assert_eq!(tokens.tokens(), 10.0, "capped at maxTokens");
        (0..20).for_each(|_| {
            tokens.failure();
        });
        assert_eq!(tokens.tokens(), 0.0, "never below zero");
    }

    #[test]
    fn backoff_bounds_grow_and_cap() {
        let policy = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
            backoff_multiplier: 2.0,
            retryable_status_codes: vec![Code::Unavailable],
        };
        let bounds: Vec<_> = (1..=4).map(|n| policy.backoff_bound(n)).collect();
        assert_eq!(bounds, [100, 200, 300, 300].map(Duration::from_millis));
        assert!((0..100).all(|_| policy.backoff(2) <= Duration::from_millis(200)));
    }
}

//! The admin protocol: one JSON object per line each way. Requests are
//! parsed by hand rather than by serde derive so that every error names the
//! field, the value and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::MAX_WEIGHT;

/// The command names, in the order `ctl --help` and the errors list them.
pub const COMMANDS: &[&str] = &[
    "status", "weights", "shift", "rollback", "drain", "enable", "reload", "certs", "renew",
];

/// A machine-readable error class, sent as `"code"` next to `"error"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// The line is not JSON, or a field is missing, unknown or invalid.
    InvalidRequest,
    /// The route, pool, backend or domain does not exist.
    NotFound,
    /// `expect_generation` did not match: another change came first.
    StaleGeneration,
    /// The change would send traffic where nothing can serve it; `force` overrides.
    Unsafe,
    /// A shift in progress on the route blocks the command.
    Conflict,
    /// The state file could not be written, so nothing changed.
    StateFile,
    /// The config file failed validation on reload.
    ConfigInvalid,
    /// Certificates are not managed by this process.
    NotConfigured,
    /// Too many clients, or the process is handing over to a new one.
    Unavailable,
    /// The line exceeded the length limit.
    TooLong,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::NotFound => "not_found",
            ErrorCode::StaleGeneration => "stale_generation",
            ErrorCode::Unsafe => "unsafe",
            ErrorCode::Conflict => "conflict",
            ErrorCode::StateFile => "state_file",
            ErrorCode::ConfigInvalid => "config_invalid",
            ErrorCode::NotConfigured => "not_configured",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::TooLong => "too_long",
        }
    }
}

/// A rejected request: nothing changed.
#[derive(Clone, Debug)]
pub struct AdminError {
    pub code: ErrorCode,
    pub message: String,
    /// Extra fields for the response, such as the current generation.
    pub extra: Map<String, Value>,
}

impl AdminError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AdminError {
        AdminError {
            code,
            message: message.into(),
            extra: Map::new(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> AdminError {
        AdminError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn with(mut self, key: &str, value: Value) -> AdminError {
        self.extra.insert(key.to_string(), value);
        self
    }

    pub fn to_response(&self) -> Value {
        let mut out = Map::new();
        out.insert("ok".into(), Value::Bool(false));
        out.insert("error".into(), Value::String(self.message.clone()));
        out.insert("code".into(), Value::String(self.code.as_str().into()));
        for (key, value) in &self.extra {
            out.insert(key.clone(), value.clone());
        }
        Value::Object(out)
    }
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Shift limits as the request gave them; missing ones come from the config.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LimitsRequest {
    pub max_error_rate: Option<f64>,
    pub max_p99: Option<Duration>,
    pub min_requests: Option<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Status,
    Weights {
        route: String,
        weights: BTreeMap<String, u32>,
        expect_generation: Option<u64>,
        force: bool,
    },
    Shift {
        route: String,
        to: String,
        /// Percentage points of the route's traffic moved per step.
        step: u32,
        every: Duration,
        limits: LimitsRequest,
        expect_generation: Option<u64>,
        force: bool,
    },
    Rollback {
        route: String,
    },
    Drain {
        pool: String,
        backend: SocketAddr,
        force: bool,
    },
    Enable {
        pool: String,
        backend: SocketAddr,
    },
    Reload,
    Certs,
    Renew {
        domain: String,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Weights { .. } => "weights",
            Request::Shift { .. } => "shift",
            Request::Rollback { .. } => "rollback",
            Request::Drain { .. } => "drain",
            Request::Enable { .. } => "enable",
            Request::Reload => "reload",
            Request::Certs => "certs",
            Request::Renew { .. } => "renew",
        }
    }
}

/// Shortest and longest step interval a shift accepts.
pub const MIN_EVERY: Duration = Duration::from_millis(100);
pub const MAX_EVERY: Duration = Duration::from_secs(24 * 3600);

/// Parses one request line. Returns the request and the client's `"id"`
/// field, if any, which the response echoes.
pub fn parse_line(line: &[u8]) -> Result<(Request, Option<Value>), (AdminError, Option<Value>)> {
    let value: Value = serde_json::from_slice(line).map_err(|err| {
        (
            AdminError::invalid(format!(
                "invalid JSON at line {} column {}: {err}; send one JSON object per line, such as {{\"cmd\":\"status\"}}",
                err.line(),
                err.column()
            )),
            None,
        )
    })?;
    let Value::Object(map) = value else {
        return Err((
            AdminError::invalid(
                "the request is not a JSON object; send one object per line, such as {\"cmd\":\"status\"}",
            ),
            None,
        ));
    };
    let id = map.get("id").cloned();
    parse_request(&map)
        .map(|r| (r, id.clone()))
        .map_err(|e| (e, id))
}

fn parse_request(map: &Map<String, Value>) -> Result<Request, AdminError> {
    let mut fields = Fields::new(map);
    let cmd = fields.string("cmd")?;
    fields.cmd = cmd.clone();
    fields.optional("id");
    let request = match cmd.as_str() {
        "status" => Request::Status,
        "weights" => Request::Weights {
            route: fields.string("route")?,
            weights: fields.weights("weights")?,
            expect_generation: fields.opt_u64("expect_generation")?,
            force: fields.opt_bool("force")?.unwrap_or(false),
        },
        "shift" => Request::Shift {
            route: fields.string("route")?,
            to: fields.string("to")?,
            step: fields.step("step")?,
            every: fields.every("every")?,
            limits: LimitsRequest {
                max_error_rate: fields.opt_rate("max_error_rate")?,
                max_p99: match fields.opt_duration("max_p99")? {
                    Some(limit) if limit.is_zero() => {
                        return Err(AdminError::invalid(
                            "max_p99 is 0s, which no window can pass; use a positive duration such as \"500ms\"",
                        ))
                    }
                    other => other,
                },
                min_requests: fields.opt_u64("min_requests")?,
            },
            expect_generation: fields.opt_u64("expect_generation")?,
            force: fields.opt_bool("force")?.unwrap_or(false),
        },
        "rollback" => Request::Rollback {
            route: fields.string("route")?,
        },
        "drain" => Request::Drain {
            pool: fields.string("pool")?,
            backend: fields.address("backend")?,
            force: fields.opt_bool("force")?.unwrap_or(false),
        },
        "enable" => Request::Enable {
            pool: fields.string("pool")?,
            backend: fields.address("backend")?,
        },
        "reload" => Request::Reload,
        "certs" => Request::Certs,
        "renew" => Request::Renew {
            domain: fields.string("domain")?,
        },
        other => {
            return Err(AdminError::invalid(format!(
                "unknown command {other:?}; use one of {}",
                COMMANDS.join(", ")
            )))
        }
    };
    fields.finish()?;
    Ok(request)
}

/// Reads the fields of one request object and remembers which were used,
/// so leftovers are reported as unknown.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    cmd: String,
    used: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>) -> Fields<'a> {
        Fields {
            map,
            cmd: String::new(),
            used: Vec::new(),
        }
    }

    fn optional(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.push(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn context(&self, key: &str) -> String {
        if self.cmd.is_empty() {
            format!("field {key:?}")
        } else {
            format!("{}: field {key:?}", self.cmd)
        }
    }

    fn required(&mut self, key: &'static str) -> Result<&'a Value, AdminError> {
        let context = self.context(key);
        self.optional(key)
            .ok_or_else(|| AdminError::invalid(format!("{context} is missing")))
    }

    fn string(&mut self, key: &'static str) -> Result<String, AdminError> {
        let context = self.context(key);
        match self.required(key)? {
            Value::String(text) if !text.is_empty() => Ok(text.clone()),
            other => Err(AdminError::invalid(format!(
                "{context} must be a non-empty string, got {other}"
            ))),
        }
    }

    fn opt_bool(&mut self, key: &'static str) -> Result<Option<bool>, AdminError> {
        let context = self.context(key);
        match self.optional(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(AdminError::invalid(format!(
                "{context} must be true or false, got {other}"
            ))),
        }
    }

    fn opt_u64(&mut self, key: &'static str) -> Result<Option<u64>, AdminError> {
        let context = self.context(key);
        match self.optional(key) {
            None => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or_else(|| {
                AdminError::invalid(format!(
                    "{context} must be a non-negative integer, got {value}"
                ))
            }),
        }
    }

    fn opt_rate(&mut self, key: &'static str) -> Result<Option<f64>, AdminError> {
        let context = self.context(key);
        match self.optional(key) {
            None => Ok(None),
            Some(value) => match value.as_f64() {
                Some(rate) if (0.0..=1.0).contains(&rate) => Ok(Some(rate)),
                _ => Err(AdminError::invalid(format!(
                    "{context} is {value}; use a fraction from 0 to 1, such as 0.05 for 5 %"
                ))),
            },
        }
    }

    fn opt_duration(&mut self, key: &'static str) -> Result<Option<Duration>, AdminError> {
        let context = self.context(key);
        match self.optional(key) {
            None => Ok(None),
            Some(Value::String(text)) => humantime::parse_duration(text).map(Some).map_err(|err| {
                AdminError::invalid(format!(
                    "{context} is {text:?}: {err}; write a number with a unit, such as \"500ms\" or \"30s\""
                ))
            }),
            Some(other) => Err(AdminError::invalid(format!(
                "{context} must be a duration string such as \"500ms\", got {other}"
            ))),
        }
    }

    fn every(&mut self, key: &'static str) -> Result<Duration, AdminError> {
        let context = self.context(key);
        let every = self
            .opt_duration(key)?
            .ok_or_else(|| AdminError::invalid(format!("{context} is missing")))?;
        if !(MIN_EVERY..=MAX_EVERY).contains(&every) {
            return Err(AdminError::invalid(format!(
                "{context} is {}; use an interval from 100ms to 24h",
                humantime::format_duration(every)
            )));
        }
        Ok(every)
    }

    fn step(&mut self, key: &'static str) -> Result<u32, AdminError> {
        let context = self.context(key);
        let value = self.required(key)?;
        match value.as_u64() {
            Some(step) if (1..=100).contains(&step) => Ok(step as u32),
            _ => Err(AdminError::invalid(format!(
                "{context} is {value}; use whole percentage points from 1 to 100"
            ))),
        }
    }

    fn address(&mut self, key: &'static str) -> Result<SocketAddr, AdminError> {
        let context = self.context(key);
        let text = self.string(key)?;
        text.parse().map_err(|_| {
            AdminError::invalid(format!(
                "{context} is {text:?}; write the backend's IP:PORT as the config lists it, such as \"127.0.0.1:8001\""
            ))
        })
    }

    fn weights(&mut self, key: &'static str) -> Result<BTreeMap<String, u32>, AdminError> {
        let context = self.context(key);
        let Value::Object(map) = self.required(key)? else {
            return Err(AdminError::invalid(format!(
                "{context} must be an object of pool names to weights, such as {{\"blue\":90,\"green\":10}}"
            )));
        };
        if map.is_empty() {
            return Err(AdminError::invalid(format!(
                "{context} is empty; name at least one pool, such as {{\"blue\":90,\"green\":10}}"
            )));
        }
        let mut weights = BTreeMap::new();
        for (pool, value) in map {
            match value.as_u64() {
                Some(weight) if weight <= u64::from(MAX_WEIGHT) => {
                    weights.insert(pool.clone(), weight as u32);
                }
                _ => {
                    return Err(AdminError::invalid(format!(
                        "invalid weight {value} for pool {pool:?}; use an integer from 0 to {MAX_WEIGHT}"
                    )))
                }
            }
        }
        Ok(weights)
    }

    fn finish(self) -> Result<(), AdminError> {
        let unknown: Vec<&String> = self
            .map
            .keys()
            .filter(|key| !self.used.contains(&key.as_str()))
            .collect();
        if let Some(key) = unknown.first() {
            let mut allowed = self.used.clone();
            allowed.retain(|k| *k != "cmd" && *k != "id");
            return Err(AdminError::invalid(format!(
                "unknown field {key:?} for command {:?}; allowed fields: {}",
                self.cmd,
                if allowed.is_empty() {
                    "none".to_string()
                } else {
                    allowed.join(", ")
                }
            )));
        }
        Ok(())
    }
}

/// Builds a success response from the command's fields.
pub fn ok_response(fields: Value, id: Option<Value>) -> Value {
    let mut out = Map::new();
    out.insert("ok".into(), Value::Bool(true));
    if let Value::Object(map) = fields {
        out.extend(map);
    }
    if let Some(id) = id {
        out.insert("id".into(), id);
    }
    Value::Object(out)
}

pub fn error_response(error: &AdminError, id: Option<Value>) -> Value {
    let mut out = error.to_response();
    if let (Some(id), Value::Object(map)) = (id, &mut out) {
        map.insert("id".into(), id);
    }
    out
}

/// Converts a weights map to JSON.
pub fn weights_json(weights: &BTreeMap<String, u32>) -> Value {
    json!(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Request, String> {
        parse_line(text.as_bytes())
            .map(|(r, _)| r)
            .map_err(|(e, _)| e.message)
    }

    #[test]
    fn weights_request() {
        let request =
            parse(r#"{"cmd":"weights","route":"app","weights":{"blue":90,"green":10},"expect_generation":4}"#)
                .unwrap();
        assert_eq!(
            request,
            Request::Weights {
                route: "app".into(),
                weights: BTreeMap::from([("blue".into(), 90), ("green".into(), 10)]),
                expect_generation: Some(4),
                force: false,
            }
        );
    }

    #[test]
    fn errors_name_the_value() {
        let negative =
            parse(r#"{"cmd":"weights","route":"app","weights":{"green":-5}}"#).unwrap_err();
        assert!(
            negative.contains("-5") && negative.contains("\"green\""),
            "{negative}"
        );
        let unknown = parse(r#"{"cmd":"dance"}"#).unwrap_err();
        assert!(unknown.contains("\"dance\""), "{unknown}");
        let extra = parse(r#"{"cmd":"status","verbose":true}"#).unwrap_err();
        assert!(extra.contains("\"verbose\""), "{extra}");
        let malformed = parse(r#"{"cmd":"status""#).unwrap_err();
        assert!(malformed.starts_with("invalid JSON"), "{malformed}");
        let every =
            parse(r#"{"cmd":"shift","route":"a","to":"g","step":10,"every":"1ms"}"#).unwrap_err();
        assert!(every.contains("1ms"), "{every}");
        let rate = parse(
            r#"{"cmd":"shift","route":"a","to":"g","step":10,"every":"1s","max_error_rate":5}"#,
        )
        .unwrap_err();
        assert!(rate.contains("fraction"), "{rate}");
        let backend = parse(r#"{"cmd":"drain","pool":"blue","backend":"localhost"}"#).unwrap_err();
        assert!(backend.contains("\"localhost\""), "{backend}");
    }

    #[test]
    fn id_is_echoed() {
        let (_, id) = parse_line(br#"{"cmd":"status","id":7}"#).unwrap();
        assert_eq!(id, Some(json!(7)));
        let (_, id) = parse_line(br#"{"cmd":"nope","id":"x"}"#).unwrap_err();
        assert_eq!(id, Some(json!("x")));
    }
}

//! Property tests over the admin protocol parser: any bytes yield a request
//! or an error that names the problem, never a panic, and every accepted
//! request satisfies the protocol's invariants.
//!
//! The number of cases per property is `PROPTEST_CASES` (default 256 here,
//! so CI stays fast); raise it for a longer local run.

use proptest::prelude::*;
use serde_json::{json, Value};
use switchyard::admin::protocol::{parse_line, Request, MAX_EVERY, MIN_EVERY};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// JSON values of every kind, including the awkward ones: huge and negative
/// numbers, floats, empty strings, nested objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[a-z0-9:._* -]{0,20}".prop_map(Value::from),
        Just(json!("127.0.0.1:8001")),
        Just(json!("30s")),
        Just(json!("-5s")),
        Just(json!("blue")),
        Just(json!("green")),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Request objects built from the real command and field names, with values
/// of any type, so that most cases reach the per-field checks.
fn request_object() -> impl Strategy<Value = Value> {
    let command = prop_oneof![
        Just("status"),
        Just("weights"),
        Just("shift"),
        Just("rollback"),
        Just("drain"),
        Just("enable"),
        Just("reload"),
        Just("certs"),
        Just("renew"),
        Just("launch"),
    ];
    let field = prop_oneof![
        Just("route"),
        Just("weights"),
        Just("to"),
        Just("step"),
        Just("every"),
        Just("pool"),
        Just("backend"),
        Just("domain"),
        Just("force"),
        Just("expect_generation"),
        Just("max_error_rate"),
        Just("max_p99"),
        Just("min_requests"),
        Just("id"),
        Just("surprise"),
    ];
    (command, prop::collection::vec((field, json_value()), 0..6)).prop_map(|(cmd, fields)| {
        let mut map = serde_json::Map::new();
        map.insert("cmd".to_string(), json!(cmd));
        for (name, value) in fields {
            map.insert(name.to_string(), value);
        }
        Value::Object(map)
    })
}

fn check_invariants(request: &Request) {
    match request {
        Request::Weights { weights, .. } => {
            assert!(!weights.is_empty(), "weights request with no pool");
        }
        Request::Shift { step, every, .. } => {
            assert!((1..=100).contains(step), "step {step} out of range");
            assert!(
                *every >= MIN_EVERY && *every <= MAX_EVERY,
                "every {every:?} out of range"
            );
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok((request, _)) = parse_line(&bytes) {
            check_invariants(&request);
        }
    }

    #[test]
    fn request_objects_parse_or_name_the_problem(object in request_object()) {
        let line = serde_json::to_vec(&object).unwrap();
        match parse_line(&line) {
            Ok((request, _)) => check_invariants(&request),
            Err((error, _)) => prop_assert!(!error.message.trim().is_empty(), "empty error for {object}"),
        }
    }
}

//! Property tests over the config parser: any text, valid TOML or not,
//! yields a config or a list of errors, never a panic.
//!
//! The number of cases per property is `PROPTEST_CASES` (default 256 here,
//! so CI stays fast); raise it for a longer local run.

use std::path::Path;

use proptest::prelude::*;
use switchyard::config::Config;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Values that exercise every kind of parse: durations, sizes, addresses,
/// numbers out of range, wrong types.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"10s\"".to_string()),
        Just("\"0s\"".to_string()),
        Just("\"500ms\"".to_string()),
        Just("\"1KiB\"".to_string()),
        Just("\"unlimited\"".to_string()),
        Just("\"127.0.0.1:8080\"".to_string()),
        Just("\"[::1]:0\"".to_string()),
        Just("\"*\"".to_string()),
        Just("\"*.example.com\"".to_string()),
        Just("true".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("0.5".to_string()),
        Just("1e300".to_string()),
        Just("9223372036854775807".to_string()),
        Just("[]".to_string()),
        Just("[200, \"200-299\", \"599-100\"]".to_string()),
        Just("{ blue = 1, green = 0 }".to_string()),
        Just("{ address = \"127.0.0.1:1\", weight = 4294967296 }".to_string()),
        "\"[ -~]{0,12}\"",
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
    ]
}

fn key() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "http",
        "https",
        "threads",
        "grace_period",
        "header_read_timeout",
        "keepalive_timeout",
        "max_header_bytes",
        "max_header_count",
        "max_connections",
        "connection_wait",
        "name",
        "hosts",
        "path_prefix",
        "pools",
        "max_body",
        "retries",
        "body_read_timeout",
        "backends",
        "algorithm",
        "consecutive_failures",
        "base_ejection",
        "max_ejection",
        "max_ejection_share",
        "interval",
        "timeout",
        "expected_status",
        "trusted_proxies",
    ])
}

fn table() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "[listeners]",
        "[limits]",
        "[proxy]",
        "[[routes]]",
        "[pools.blue]",
        "[pools.blue.passive]",
        "[pools.blue.health]",
        "[admin]",
        "[tls]",
        "[acme]",
    ])
}

/// Config-shaped text: tables with key/value lines drawn from the real
/// schema, so that validation (not just the TOML reader) is reached.
fn config_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (table(), prop::collection::vec((key(), value()), 0..6)),
        0..6,
    )
    .prop_map(|tables| {
        let mut text = String::new();
        for (name, lines) in tables {
            text.push_str(name);
            text.push('\n');
            for (key, value) in lines {
                text.push_str(&format!("{key} = {value}\n"));
            }
        }
        text
    })
}

const BASE: &str = "[listeners]\nhttp = \"127.0.0.1:8080\"\n\n[[routes]]\nname = \"app\"\nhosts = [\"*\"]\npools = { blue = 1 }\n\n[pools.blue]\nbackends = [\"127.0.0.1:9000\"]\n";

fn parse(text: &str) {
    match Config::parse(text, Path::new("/fuzz/switchyard.toml")) {
        Ok(config) => {
            assert!(!config.routes.is_empty());
        }
        Err(errors) => {
            assert!(!errors.errors.is_empty(), "Err with no error for {text:?}");
            for error in &errors.errors {
                assert!(!error.message.is_empty(), "an empty message for {text:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn any_text_is_ok_or_errors(text in "\\PC{0,400}") {
        parse(&text);
    }

    #[test]
    fn config_shaped_text_is_ok_or_errors(text in config_text()) {
        parse(&text);
    }

    #[test]
    fn valid_base_with_random_additions(extra in config_text()) {
        // Duplicate tables are TOML errors; appending still reaches the
        // validators for the tables the base lacks.
        parse(&format!("{BASE}\n{extra}"));
    }

    #[test]
    fn byte_mutations_of_a_valid_file(position in 0usize..BASE.len(), byte in any::<u8>()) {
        let mut bytes = BASE.as_bytes().to_vec();
        bytes[position] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            parse(&text);
        }
    }
}

#[test]
fn base_config_is_valid() {
    let config = Config::parse(BASE, Path::new("/fuzz/switchyard.toml"))
        .unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(config.limits, switchyard::config::Limits::default());
}

//! `switchyard check` on valid and broken configs.

use std::process::Command;

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

const VALID: &str = r#"
[listeners]
http = "127.0.0.1:8080"

[[routes]]
name = "webhook"
hosts = ["api.example.com"]
path_prefix = "/webhook"
pools = { blue = 100, green = 0 }

[pools.blue]
backends = ["127.0.0.1:8001", { address = "127.0.0.1:8002", weight = 2 }]
health = { path = "/health", interval = "2s", timeout = "1s", expected_status = [200, "204-206"] }

[pools.green]
backends = ["127.0.0.1:8003"]
"#;

#[test]
fn valid_config_prints_summary() {
    let (code, stdout, stderr) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ok: 1 route(s), 2 pool(s), 3 backend(s)"),
        "{stdout}"
    );
}

#[test]
fn example_configs_are_valid() {
    for file in ["config/switchyard.example.toml", "config/demo.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn broken_configs_name_each_problem() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "undefined pool",
            "pools = { blue = 100, green = 0 }",
            &[r#"route "webhook": pool "purple" is not defined"#],
        ),
        (
            "negative weight",
            "pools = { blue = 100, green = 0 }",
            &[r#"pool "blue": invalid weight -5"#],
        ),
        (
            "all weights zero",
            "pools = { blue = 100, green = 0 }",
            &["every pool has weight 0"],
        ),
        (
            "unknown key",
            "path_prefix = \"/webhook\"",
            &["unknown field `pathprefix`"],
        ),
        (
            "bad duration",
            "interval = \"2s\"",
            &["invalid duration \"2 parsecs\""],
        ),
        (
            "bad address",
            "\"127.0.0.1:8003\"",
            &[r#"backend "not an address""#],
        ),
        (
            "bad host",
            "hosts = [\"api.example.com\"]",
            &[r#"invalid host "bad host!""#],
        ),
        (
            "bad status",
            "expected_status = [200, \"204-206\"]",
            &["invalid status 999"],
        ),
        (
            "timeout above interval",
            "timeout = \"1s\"",
            &["timeout must be above 0 and at most the interval"],
        ),
    ];
    let replacements: &[(&str, &str)] = &[
        (
            "pools = { blue = 100, green = 0 }",
            "pools = { blue = 100, green = 0, purple = 1 }",
        ),
        (
            "pools = { blue = 100, green = 0 }",
            "pools = { blue = -5, green = 0 }",
        ),
        (
            "pools = { blue = 100, green = 0 }",
            "pools = { blue = 0, green = 0 }",
        ),
        ("path_prefix = \"/webhook\"", "pathprefix = \"/webhook\""),
        ("interval = \"2s\"", "interval = \"2 parsecs\""),
        ("\"127.0.0.1:8003\"", "\"not an address\""),
        ("hosts = [\"api.example.com\"]", "hosts = [\"bad host!\"]"),
        (
            "expected_status = [200, \"204-206\"]",
            "expected_status = [999]",
        ),
        ("timeout = \"1s\"", "timeout = \"5s\""),
    ];
    for ((name, _, expected), (from, to)) in cases.iter().zip(replacements) {
        let text = VALID.replacen(from, to, 1);
        assert_ne!(text, VALID, "case {name} changed nothing");
        let (code, _stdout, stderr) = check(&text);
        assert_eq!(code, 1, "case {name}: {stderr}");
        for needle in *expected {
            assert!(
                stderr.contains(needle),
                "case {name}: expected {needle:?} in:\n{stderr}"
            );
        }
        assert!(
            stderr.contains("switchyard.toml"),
            "case {name}: no file name in:\n{stderr}"
        );
        assert!(
            stderr.contains("line "),
            "case {name}: no line number in:\n{stderr}"
        );
    }
}

#[test]
fn several_errors_reported_together() {
    let text = VALID
        .replacen(
            "pools = { blue = 100, green = 0 }",
            "pools = { blue = 100, green = 0, purple = 1 }",
            1,
        )
        .replacen("\"127.0.0.1:8003\"", "\"nowhere\"", 1);
    let (code, _stdout, stderr) = check(&text);
    assert_eq!(code, 1);
    assert!(stderr.contains("purple"), "{stderr}");
    assert!(stderr.contains("nowhere"), "{stderr}");
    assert!(stderr.contains("2 error(s)"), "{stderr}");
}

#[test]
fn missing_file_is_reported() {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "-c", "/nonexistent/switchyard.toml"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot read the config file"));
}

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

/// Builds an HTTPS config with `store` and the lines in `tls` in its
/// `[tls]` table, and the `acme` text appended.
fn https_config(store: &std::path::Path, tls: &str, acme: &str) -> String {
    format!(
        "[listeners]\nhttp = \"127.0.0.1:8080\"\nhttps = \"127.0.0.1:8443\"\n\n\
         [tls]\nstore = \"{}\"\n{tls}\n\n\
         [[routes]]\nname = \"app\"\nhosts = [\"api.example.com\"]\npools = {{ blue = 100 }}\n\n\
         [pools.blue]\nbackends = [\"127.0.0.1:8001\"]\n{acme}",
        store.display()
    )
}

const ACME: &str = "\n[acme]\ncontact = [\"mailto:ops@example.com\"]\n";

fn warnings(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| line.contains(": warning: "))
        .collect()
}

#[test]
fn empty_store_warns_but_passes() {
    let store = tempfile::tempdir().unwrap();
    let missing = store.path().join("not-created-yet");
    for dir in [store.path(), missing.as_path()] {
        let (code, stdout, stderr) = check(&https_config(dir, "", ""));
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("ok: 1 route(s)"), "{stdout}");
        let lines = warnings(&stderr);
        assert_eq!(lines.len(), 1, "{stderr}");
        let line = lines[0];
        assert!(
            line.contains("switchyard.toml: warning: tls.store"),
            "{line}"
        );
        assert!(line.contains(&dir.display().to_string()), "{line}");
        let state = if dir == missing.as_path() {
            "does not exist yet"
        } else {
            "no loadable certificate"
        };
        assert!(line.contains(state), "{line}");
        assert!(line.contains("NAME.crt and NAME.key"), "{line}");
        assert!(line.contains("[acme]"), "{line}");
    }
    assert!(!missing.exists(), "check created the store folder");
}

#[test]
fn unloadable_pair_is_named() {
    let store = tempfile::tempdir().unwrap();
    switchyard::tls::generate_self_signed(store.path(), "a", &["api.example.com"]).unwrap();
    std::fs::remove_file(store.path().join("a.key")).unwrap();
    let (code, _stdout, stderr) = check(&https_config(store.path(), "", ""));
    assert_eq!(code, 0, "{stderr}");
    let lines = warnings(&stderr);
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(lines[0].contains("certificate not loaded"), "{stderr}");
    assert!(lines[0].contains("a.key"), "{stderr}");
    assert!(lines[1].contains("no loadable certificate"), "{stderr}");
}

#[test]
fn missing_default_certificate_warns() {
    let store = tempfile::tempdir().unwrap();
    switchyard::tls::generate_self_signed(store.path(), "a", &["api.example.com"]).unwrap();
    let tls = "default_certificate = \"fallback\"";
    let (code, stdout, stderr) = check(&https_config(store.path(), tls, ""));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ok: 1 route(s)"), "{stdout}");
    let lines = warnings(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(line.contains("tls.default_certificate"), "{line}");
    assert!(line.contains("\"fallback\""), "{line}");
    assert!(line.contains(&store.path().display().to_string()), "{line}");
    assert!(line.contains("fallback.crt and fallback.key"), "{line}");
    assert!(line.contains("[acme]"), "{line}");

    // With ACME on, the fix names the certificate ACME obtains.
    let (code, _stdout, stderr) = check(&https_config(store.path(), tls, ACME));
    assert_eq!(code, 0, "{stderr}");
    let lines = warnings(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("\"acme_api.example.com\""), "{stderr}");
}

#[test]
fn certificates_to_come_pass_quietly() {
    let empty = tempfile::tempdir().unwrap();
    let loaded = tempfile::tempdir().unwrap();
    switchyard::tls::generate_self_signed(loaded.path(), "a", &["api.example.com"]).unwrap();
    let cases: &[(&str, &std::path::Path, &str, &str)] = &[
        ("ACME fills the empty store", empty.path(), "", ACME),
        (
            "ACME obtains the default",
            empty.path(),
            "default_certificate = \"acme_api.example.com\"",
            ACME,
        ),
        (
            "default is loaded",
            loaded.path(),
            "default_certificate = \"a\"",
            "",
        ),
        ("one certificate, no default", loaded.path(), "", ""),
    ];
    for (name, store, tls, acme) in cases {
        let (code, _stdout, stderr) = check(&https_config(store, tls, acme));
        assert_eq!(code, 0, "case {name}: {stderr}");
        assert!(warnings(&stderr).is_empty(), "case {name}: {stderr}");
    }

    // Without HTTPS the store is not used, so nothing is checked.
    let (code, _stdout, stderr) = check(VALID);
    assert_eq!(code, 0, "{stderr}");
    assert!(warnings(&stderr).is_empty(), "{stderr}");
}

#[test]
fn acme_without_exact_hosts_warns() {
    let store = tempfile::tempdir().unwrap();
    let text = https_config(store.path(), "", ACME).replace("\"api.example.com\"", "\"*\"");
    let (code, _stdout, stderr) = check(&text);
    assert_eq!(code, 0, "{stderr}");
    let lines = warnings(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("no loadable certificate"), "{stderr}");
    assert!(lines[0].contains("exact host name"), "{stderr}");
}

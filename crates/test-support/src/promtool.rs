//! `promtool check metrics`: Prometheus's own parser and linter over an
//! exposition. A missing promtool fails the test, never skips it (CI
//! installs Debian's `prometheus` package; see `scripts/test`).

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `promtool check metrics` on `text`. Ok when it passes, or when it
/// reports lint findings only (exit status 3: the text parsed) and `excused`
/// accepts every line of them; otherwise Err with what promtool said.
///
/// `excused` names the findings a caller must live with (e.g. the camel case
/// of upstream DCGM/node-exporter names); [`no_lint`] excuses none.
///
/// # Panics
/// When promtool cannot be run.
pub fn check_metrics(text: &str, excused: impl Fn(&str) -> bool) -> Result<(), String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be installed (apt-get install prometheus)");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => Ok(()),
        Some(3) if said.lines().all(excused) => Ok(()),
        _ => Err(said),
    }
}

/// [`check_metrics`], failing the test with promtool's findings and the text.
pub fn assert_metrics_pass(text: &str, excused: impl Fn(&str) -> bool) {
    if let Err(said) = check_metrics(text, excused) {
        panic!("promtool check metrics failed:\n{said}\n---\n{text}");
    }
}

/// Excuses no lint finding.
pub fn no_lint(_line: &str) -> bool {
    false
}

//! A browser scenario (a node script under `tests/client/` driving headless
//! Chromium): started with its environment, read one JSON line at a time
//! (each either a step's result or `{"error"}`), and ended with a check of
//! its exit status. Killed if the test fails first (Chromium, on the other
//! end of playwright's pipe, exits with it).

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::client::node_script;

pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    pub fn start(script: &str, env: &[(&str, String)]) -> Browser {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(std::path::Path::new(&chromium).exists(), "Chromium ({chromium}) is missing: run the suite with scripts/test.sh, which installs it");
        let mut child = node_script(script, "playwright-core")
            .env("CHROMIUM", &chromium)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .spawn()
            .expect("node is installed");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Browser { child, stdin, lines }
    }

    /// Where screenshots go: `target/screenshots/`.
    pub fn screenshots() -> String {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots");
        std::fs::create_dir_all(dir).unwrap();
        dir.to_owned()
    }

    /// The script's next line; fails the test on an `{"error"}` line, on
    /// its end, or after `secs` seconds without one.
    pub async fn next(&mut self, what: &str, secs: u64) -> Value {
        let line = tokio::time::timeout(Duration::from_secs(secs), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser said nothing for {secs} s, waiting for {what}"))
            .expect("read the browser script's output")
            .unwrap_or_else(|| panic!("the browser script ended before {what}"));
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        if let Some(e) = v.get("error") {
            panic!("in the browser, waiting for {what} (at its step \"{}\"): {e}", v["step"].as_str().unwrap_or("?"));
        }
        v
    }

    /// Sends the script one JSON line.
    pub async fn tell(&mut self, v: &Value) {
        self.stdin.write_all(format!("{v}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    /// Waits for the script to end, and checks that it succeeded.
    pub async fn finish(mut self) {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.expect("the browser script ends").unwrap();
        assert!(status.success(), "the browser script exited with {status}");
    }
}

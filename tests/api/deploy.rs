//! The deployment kit under `deploy/`: the compose file is valid for
//! `docker-compose` (which needs no engine to check it), the Prometheus and
//! Grafana files parse, and every series the alert rules and the dashboard
//! use is one a node exports.

use std::collections::HashSet;


use crate::helpers::Cluster;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[tokio::test]
async fn the_compose_file_is_valid_and_refuses_to_run_without_a_token_secret() {
    let compose = |secret: Option<&str>| {
        let mut cmd = tokio::process::Command::new("docker-compose");
        cmd.args(["-f", "deploy/docker-compose.yml", "config", "-q"]).current_dir(ROOT).env_remove("NATTER_JWT_SECRET");
        if let Some(s) = secret {
            cmd.env("NATTER_JWT_SECRET", s);
        }
        cmd
    };
    let ok = compose(Some("0123456789abcdef0123456789abcdef")).output().await.expect("docker-compose is installed (scripts/services.sh tools)");
    assert!(ok.status.success(), "docker-compose config:\n{}", String::from_utf8_lossy(&ok.stderr));
    let refused = compose(None).output().await.unwrap();
    assert!(!refused.status.success(), "the compose file must not start nodes without a shared token secret");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("NATTER_JWT_SECRET"), "{}", String::from_utf8_lossy(&refused.stderr));
}

/// Every `natter_…` name in `text`.
fn series_used(text: &str) -> HashSet<String> {
    let mut out = HashSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("natter_") {
        let name: String = rest[i..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[i + name.len()..];
        out.insert(name);
    }
    out
}

#[tokio::test]
async fn the_alerts_and_the_dashboard_use_only_series_a_node_exports() {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/target/services/venv/bin/python");
    let files = ["deploy/prometheus/alerts.yml", "deploy/prometheus/prometheus.yml", "deploy/grafana/provisioning/datasources/prometheus.yml", "deploy/grafana/provisioning/dashboards/natter.yml"];
    let parse = tokio::process::Command::new(python)
        .args(["-c", "import sys, yaml\nfor f in sys.argv[1:]: yaml.safe_load(open(f))"])
        .args(files)
        .current_dir(ROOT)
        .output()
        .await
        .expect("the services venv has python (scripts/test.sh)");
    assert!(parse.status.success(), "a deploy YAML file does not parse:\n{}", String::from_utf8_lossy(&parse.stderr));
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{ROOT}/deploy/grafana/dashboards/natter.json")).unwrap()).unwrap();
    assert!(dashboard["panels"].as_array().is_some_and(|p| !p.is_empty()));

    // What a distributed node exports: each family's samples by type.
    // Families with labels appear once used: a request, a send, its projection.
    let c = Cluster::start(1).await;
    let (amy, bob) = (c.register(0, "Amy").await, c.register(0, "Bob").await);
    c.send(0, &amy, &bob, "hello", None).await.ok();
    crate::helpers::eventually("the send to be projected", || async { c.metric(0, "natter_projection_applied_total{projection=\"mongo-views\"}").await >= 1.0 }).await;
    let text = c.http.get(c.url(0, "/metrics")).send().await.unwrap().text().await.unwrap();
    let mut exported = HashSet::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) = (parts.next(), parts.next(), parts.next(), parts.next()) {
            let samples: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            exported.extend(samples.iter().map(|s| format!("{name}{s}")));
            exported.insert(name.to_owned());
        }
    }
    assert!(exported.contains("natter_nats_connected"), "{text}");
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/dashboards/natter.json"] {
        let used = series_used(&std::fs::read_to_string(format!("{ROOT}/{file}")).unwrap());
        assert!(!used.is_empty());
        let unknown: Vec<&String> = used.iter().filter(|s| !exported.contains(*s)).collect();
        assert!(unknown.is_empty(), "{file} uses series no node exports: {unknown:?}");
    }
}

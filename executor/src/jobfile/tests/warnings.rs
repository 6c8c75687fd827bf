//! What only guides the scheduler is warned about, with its line, and
//! the job still runs.

use super::*;

#[test]
fn scheduling_fields_are_only_warned_about() {
    let text = today_job(
        "",
        "      constraint {\n        attribute = \"${attr.kernel.name}\"\n        value = \"linux\"\n      }\n      meta {\n        owner = \"me\"\n      }\n      kill_signal = \"SIGINT\"\n      env {\n        A = \"1\"\n      }",
    )
    .replacen("  group \"g\" {\n", "  group \"g\" {\n    count = 3\n    spread {\n      attribute = \"${node.datacenter}\"\n    }\n", 1)
    .replacen("job \"j\" {\n", "job \"j\" {\n  datacenters = [\"dc1\"]\n  affinity {\n    attribute = \"x\"\n  }\n", 1);
    let got = warnings(&text);
    let expect = [
        ("datacenters", "job.datacenters"),
        ("affinity {", "job.affinity"),
        ("count = 3", "group.count"),
        ("spread {", "group.spread"),
        ("constraint {", "constraint"),
        ("meta {", "meta"),
        ("kill_signal", "kill_signal"),
        ("env {", "env"),
    ];
    let expect: Vec<(usize, String)> = expect
        .iter()
        .map(|(needle, field)| (line_of(&text, needle), field.to_string()))
        .collect();
    assert_eq!(got, expect);
}

#[test]
fn more_fields_that_are_only_warned_about() {
    let text = today_job(
        "",
        "      artifact {\n        source = \"http://h/linux.img\"\n        destination = \"local/\"\n        chown = true\n        options {\n          checksum = \"md5:0123456789abcdef0123456789abcdef\"\n        }\n      }\n      resources {\n        disk = 300\n        secrets = 1\n        numa {\n          affinity = \"require\"\n        }\n      }\n      restart {\n        render_templates = true\n      }\n      leader = true\n      logs {\n        max_files = 3\n      }",
    )
    // The task's own artifact above delivers the same file as the
    // default one: drop the default to keep one.
    .replacen(&format!("      artifact {{\n        source = \"http://h/linux.img\"\n        options {{\n          checksum = \"md5:{MD5}\"\n        }}\n      }}\n"), "", 1)
    .replacen(
        "    network {\n",
        "    network {\n      mbits = 10\n      dns {\n        servers = [\"1.1.1.1\"]\n      }\n      port \"spare\" {\n        static = 9999\n        host_network = \"public\"\n      }\n",
        1,
    )
    .replace("static = 18080", "static = 18080\n        to = 8080")
    .replacen("job \"j\" {", "variable \"dc\" {\n  default = \"dc1\"\n}\n\njob \"j\" {", 1);
    let got = warnings(&text);
    let expect = [
        ("variable", "variable"),
        ("mbits", "network.mbits"),
        ("dns {", "network.dns"),
        ("port \"spare\"", "network.port \"spare\""),
        ("host_network", "network.port \"spare\".host_network"),
        ("to = 8080", "network.port \"http\".to"),
        ("chown", "artifact.chown"),
        ("disk = 300", "resources.disk"),
        ("secrets", "resources.secrets"),
        ("numa", "resources.numa"),
        ("render_templates", "restart.render_templates"),
        ("leader", "leader"),
        ("logs {", "logs"),
    ];
    let expect: Vec<(usize, String)> = expect
        .iter()
        .map(|(needle, field)| (line_of(&text, needle), field.to_string()))
        .collect();
    let mut expect = expect;
    expect.sort();
    let mut got = got;
    got.sort();
    assert_eq!(got, expect);
}

//! Every refusal names the job's field and its line, and says why.

use super::*;

/// The problems of a job that must be refused, as (line, field, problem).
fn problems(text: &str) -> Vec<(usize, String, String)> {
    match convert(text, None) {
        Err(JobError::Problems(Problems(list))) => list
            .into_iter()
            .map(|p| (p.line, p.field, p.problem))
            .collect(),
        other => panic!("expected problems, got {other:?}\n---\n{text}"),
    }
}

/// The job is refused for exactly one problem: on the line holding
/// `needle`, of `field`, saying `why`.
#[track_caller]
fn refused(text: &str, needle: &str, field: &str, why: &str) {
    let got = problems(text);
    assert_eq!(got.len(), 1, "{got:#?}");
    let (line, f, problem) = &got[0];
    assert_eq!(
        (*line, f.as_str()),
        (line_of(text, needle), field),
        "{problem}"
    );
    assert!(problem.contains(why), "{problem:?} lacks {why:?}");
}

#[test]
fn unsupported_config_fields() {
    let cases = [
        (
            "        guest_agent = true",
            "config.guest_agent",
            "no guest agent channel",
        ),
        (
            "        emulator = \"qemu-system-aarch64\"",
            "config.emulator",
            "only qemu-system-x86_64 runs here",
        ),
        (
            "        accelerator = \"hvf\"",
            "config.accelerator",
            "\"hvf\" is not supported: kvm or tcg",
        ),
        (
            "        drive_interface = \"scsi\"",
            "config.drive_interface",
            "\"scsi\" is not supported: ide or virtio",
        ),
        (
            "        graceful_shutdown = \"yes\"",
            "config.graceful_shutdown",
            "expected true or false, found \"yes\"",
        ),
        (
            "        args = \"-nographic\"",
            "config.args",
            "expected a list of strings",
        ),
        (
            "        image_source = \"http://h/x.iso\"",
            "config.image_source",
            "not both",
        ),
        (
            "        checksum = \"abc\"",
            "config.checksum",
            "artifact's options { checksum }",
        ),
        (
            "        host_port = 8080",
            "config.guest_port",
            "is required with host_port",
        ),
        (
            "        nic = \"e1000\"",
            "config.nic",
            "\"nic\" is not a field of the qemu driver's config (image_path,",
        ),
        (
            "        args = [\"${NOMAD_PORT_http}\"]",
            "config.args",
            "cannot be evaluated outside the scheduler",
        ),
        (
            "        machine_type = \"pc,accel=kvm\"",
            "config.machine_type (our machine_type)",
            "is not a qemu machine name",
        ),
    ];
    for (line, field, why) in cases {
        let text = today_job(line, "");
        refused(&text, line.trim(), field, why);
    }
}

#[test]
fn unsupported_task_fields() {
    let cases = [
        (
            "      template {\n        data = \"x\"\n      }",
            "template",
            "template",
            "not supported: templates are rendered by the scheduler",
        ),
        (
            "      user = \"nobody\"",
            "user",
            "user",
            "qemu runs as the executor's user",
        ),
        (
            "      volume_mount {\n        volume = \"data\"\n      }",
            "volume_mount",
            "volume_mount",
            "the VM's only disk is its image",
        ),
        (
            "      resources {\n        device \"nvidia/gpu\" {}\n      }",
            "device",
            "resources.device",
            "devices are not passed through",
        ),
        (
            "      resources {\n        cpu = 100\n        cores = 2\n      }",
            "cpu",
            "resources.cpu",
            "not both",
        ),
        (
            "      resources {\n        memory = 512\n        memory_max = 256\n      }",
            "memory_max",
            "resources.memory_max",
            "below memory (512)",
        ),
        (
            "      resources {\n        memory = 8\n      }",
            "memory = 8",
            "resources.memory (our memory_mb)",
            "8 is out of range (16 to",
        ),
        (
            "      kill_timeout = 30",
            "kill_timeout",
            "kill_timeout",
            "expected a duration string like \"30s\"",
        ),
        (
            "      kill_timeout = \"5 minutes\"",
            "kill_timeout",
            "kill_timeout",
            "is not a duration",
        ),
        (
            "      restart {\n        mode = \"retry\"\n      }",
            "mode",
            "restart.mode",
            "not a restart mode: fail or delay",
        ),
        (
            "      restart {\n        attempts = -1\n      }",
            "attempts",
            "restart.attempts (our restart.attempts)",
            "out of range",
        ),
        (
            "      restart {\n        interval = \"0s\"\n      }",
            "interval",
            "restart.interval (our restart.interval_s)",
            "out of range",
        ),
        (
            "      restart {\n        jitter = 1\n      }",
            "jitter",
            "restart.jitter",
            "not a field of restart",
        ),
        (
            "      priority = 5",
            "priority",
            "priority",
            "not a field of a task",
        ),
    ];
    for (extra, needle, field, why) in cases {
        refused(&today_job("", extra), needle, field, why);
    }
}

#[test]
fn ports_that_cannot_be_forwarded() {
    // A port_map label without a network port.
    let text = today_job("", "").replace("http = 8080", "web = 8080");
    refused(
        &text,
        "web = 8080",
        "config.port_map.web",
        "names no network port",
    );
    // A dynamic port: its line, and why.
    let text = today_job("", "").replace("        static = 18080\n", "");
    refused(
        &text,
        "port \"http\"",
        "network.port \"http\"",
        "dynamic ports are not supported here",
    );
    // No port at all.
    let text =
        today_job("", "").replace("        port_map {\n          http = 8080\n        }\n", "");
    refused(&text, "config {", "config.port_map", "forwards no port");
    // Bridge networking.
    let text = today_job("", "").replacen(
        "    network {\n",
        "    network {\n      mode = \"bridge\"\n",
        1,
    );
    refused(&text, "mode", "network.mode", "\"bridge\" is not supported");
    // A port declared twice.
    let text = today_job(
        "",
        "      network {\n        port \"http\" { static = 1 }\n      }",
    );
    refused(
        &text,
        "{ static = 1 }",
        "network.port \"http\"",
        "declared twice (first at line 4)",
    );
    // A bad static number, as the task file would refuse it.
    let text = today_job("", "").replace("static = 18080", "static = 70000");
    refused(
        &text,
        "http = 8080",
        "config.port_map.http (our ports[0].host)",
        "70000 is out of range",
    );
}

#[test]
fn images_that_cannot_be_fetched() {
    let job = |artifact: &str, image_path: &str| {
        job_with_task(&format!(
            "{artifact}\n      config {{\n        image_path = \"{image_path}\"\n        port_map = {{ http = 80 }}\n      }}"
        ))
    };
    let artifact = |body: &str| format!("      artifact {{\n{body}\n      }}");
    let with_sum = |source: &str| {
        artifact(&format!(
            "        source = \"{source}\"\n        options {{\n          checksum = \"md5:{MD5}\"\n        }}"
        ))
    };

    refused(
        &job(&with_sum("http://h/linux.img"), "local/other.img"),
        "image_path",
        "config.image_path",
        "its artifacts deliver local/linux.img",
    );
    refused(
        &job("", "/var/images/linux.img"),
        "image_path",
        "config.image_path",
        "the task has no artifact",
    );
    refused(
        &job(
            &artifact("        source = \"http://h/linux.img\""),
            "local/linux.img",
        ),
        "artifact {",
        "artifact.options.checksum",
        "images are always verified here",
    );
    refused(
        &job(
            &with_sum("http://h/linux.img.tar.gz"),
            "local/linux.img.tar",
        ),
        "source",
        "artifact.source",
        "the scheduler would unpack this file",
    );
    refused(
        &job(&with_sum("s3::https://b/linux.img"), "local/linux.img"),
        "source",
        "artifact.source (our image_source)",
        "scheme \"s3\" is not supported",
    );
    refused(
        &job(&with_sum("ftp://h/linux.img"), "local/linux.img"),
        "source",
        "artifact.source (our image_source)",
        "use http, https or file",
    );
    refused(
        &job(
            &artifact(
                "        source = \"http://h/linux.img\"\n        options {\n          checksum = \"sha1:0123456789abcdef0123456789abcdef01234567\"\n        }",
            ),
            "local/linux.img",
        ),
        "checksum",
        "artifact.options.checksum (our checksum)",
        "Unknown checksum algorithm \"sha1\"",
    );
    refused(
        &job(
            &artifact(
                "        source = \"http://h/linux.img\"\n        headers {\n          X = \"y\"\n        }\n        options {\n          checksum = \"md5:0123456789abcdef0123456789abcdef\"\n        }",
            ),
            "local/linux.img",
        ),
        "headers",
        "artifact.headers",
        "without extra headers",
    );
    refused(
        &job(
            &artifact(
                "        source = \"http://h/linux.img\"\n        mode = \"dir\"\n        options {\n          checksum = \"md5:0123456789abcdef0123456789abcdef\"\n        }",
            ),
            "local/linux.img",
        ),
        "mode",
        "artifact.mode",
        "the image is one file",
    );
    let two = format!(
        "{}\n{}",
        with_sum("http://h/linux.img"),
        with_sum("http://h/seed.iso")
    );
    refused(
        &job(&two, "local/linux.img"),
        "seed.iso",
        "artifact",
        "only the artifact that delivers image_path",
    );

    // The original generation: its checksum is required.
    let text = job_with_task(
        "      config {\n        image_source = \"http://h/x.iso\"\n        host_port = 1\n        guest_port = 2\n      }",
    );
    refused(
        &text,
        "image_source",
        "config.checksum",
        "is required with image_source",
    );
    let text = job_with_task("      config {\n        port_map = { http = 80 }\n      }");
    refused(&text, "config {", "config", "needs image_path");
    let text = job_with_task("");
    refused(&text, "task \"web\"", "config", "has no config block");
}

#[test]
fn task_file_checks_point_at_the_job() {
    let text = today_job("", "").replace("task \"web\"", "task \"my web\"");
    refused(
        &text,
        "task \"my web\"",
        "task \"my web\" (our name)",
        "contains ' '",
    );
    let text = today_job("", "").replace(&format!("md5:{MD5}"), "md5:abc");
    refused(
        &text,
        "checksum",
        "artifact.options.checksum (our checksum)",
        "has 32 hex digits, this one has 3",
    );
}

#[test]
fn several_problems_are_reported_together() {
    let text = today_job(
        "        guest_agent = true\n        emulator = \"qemu-system-arm\"",
        "      template {\n        data = \"x\"\n      }",
    );
    let got: Vec<(usize, String)> = problems(&text)
        .into_iter()
        .map(|(l, f, _)| (l, f))
        .collect();
    assert_eq!(
        got,
        [
            (
                line_of(&text, "guest_agent"),
                "config.guest_agent".to_string()
            ),
            (line_of(&text, "emulator"), "config.emulator".to_string()),
            (line_of(&text, "template"), "template".to_string()),
        ]
    );
    let shown = convert(&text, None).unwrap_err().to_string();
    assert!(shown.starts_with("3 problems:\n    line "), "{shown}");
}

#[test]
fn malformed_hcl_and_files_without_a_job() {
    let err = convert("job \"x\" {\n  group \"g\" {\n    count = \n  }\n}\n", None).unwrap_err();
    let JobError::Syntax { line, .. } = err else {
        panic!("{err:?}")
    };
    assert!(line == 3 || line == 4, "{line}");
    assert!(
        err.to_string()
            .starts_with(&format!("Malformed HCL at line {line}, column "))
    );

    let err = convert(
        "job \"x\" {\n  type = \"batch\"\n  type = \"service\"\n}\n",
        None,
    )
    .unwrap_err();
    assert!(matches!(err, JobError::Syntax { line: 3, .. }), "{err:?}");

    let p = problems("variable \"dc\" {}\n");
    assert_eq!(p[0].0, 1);
    assert!(p[0].2.contains("no job block"), "{p:?}");
    let p = problems("job \"a\" {}\njob \"b\" {}\n");
    assert_eq!(
        (p[0].0, p[0].2.as_str()),
        (2, "a job file holds one job; this is a second one")
    );
    let p = problems("resource \"x\" \"y\" {}\n");
    assert_eq!((p[0].0, p[0].1.as_str()), (1, "resource"));
    let text = today_job("", "").replacen("job \"j\" {\n", "job \"j\" {\n  type = \"cron\"\n", 1);
    refused(&text, "cron", "job.type", "not a job type");
    let text = today_job("", "").replacen(
        "  group \"g\" {\n",
        "  group \"g\" {\n    volume \"data\" {\n      type = \"host\"\n    }\n",
        1,
    );
    refused(
        &text,
        "volume",
        "group.volume",
        "the VM's only disk is its image",
    );
}

#[test]
fn malformed_blocks_and_unknown_fields_everywhere() {
    let artifact = |body: &str| {
        job_with_task(&format!(
            "      artifact {{\n        source = \"http://h/linux.img?checksum=md5:{MD5}\"\n{body}\n      }}\n      config {{\n        image_path = \"local/linux.img\"\n        port_map = {{ http = 80 }}\n      }}"
        ))
    };
    let cases: Vec<(String, &str, &str, &str)> = vec![
        (
            today_job("        port_map = 80", ""),
            "port_map = 80",
            "config.port_map",
            "expected a map of port labels",
        ),
        (
            today_job("        port_map = { ssh = \"x\" }", ""),
            "ssh = \"x\"",
            "config.port_map.ssh",
            "expected a whole number",
        ),
        (
            today_job("        port_map = { http = 81 }", ""),
            "http = 81",
            "config.port_map.http",
            "mapped twice (first at line 19)",
        ),
        (
            today_job("        disk {\n          size = 1\n        }", ""),
            "disk {",
            "config.disk",
            "not a block of the qemu driver's config",
        ),
        (
            today_job("", "").replace(
                "          http = 8080\n",
                "          http = 8080\n          tcp {\n          }\n",
            ),
            "tcp {",
            "config.port_map.tcp",
            "expected label = guest_port",
        ),
        (
            artifact("        mode = \"symlink\""),
            "symlink",
            "artifact.mode",
            "not an artifact mode",
        ),
        (
            artifact("        getter = \"git\""),
            "getter",
            "artifact.getter",
            "not a field of artifact",
        ),
        (
            artifact("        options {\n          depth = 1\n        }"),
            "depth",
            "artifact.options.depth",
            "takes checksum and archive, not depth",
        ),
        (
            artifact(&format!(
                "        options {{\n          checksum = \"md5:{}\"\n        }}",
                "f".repeat(32)
            )),
            "ffff",
            "artifact.options.checksum",
            "differs from the checksum in the source URL",
        ),
        (
            artifact("        options = \"x\""),
            "options = ",
            "artifact.options",
            "expected a map of options",
        ),
        (
            artifact("        meta {\n        }"),
            "meta {",
            "artifact.meta",
            "not a block of artifact",
        ),
        (
            job_with_task(
                "      artifact {\n        destination = \"local/\"\n      }\n      config {\n        image_path = \"local/x.img\"\n        port_map = { http = 80 }\n      }",
            ),
            "artifact {",
            "artifact.source",
            "is required",
        ),
        (
            today_job("", "      resources {\n        gpu = 1\n      }"),
            "gpu",
            "resources.gpu",
            "not a field of resources",
        ),
        (
            today_job(
                "",
                "      resources {\n        limits {\n        }\n      }",
            ),
            "limits",
            "resources.limits",
            "not a block of resources",
        ),
        (
            today_job("", "      restart {\n        policy {\n        }\n      }"),
            "policy",
            "restart.policy",
            "not a block of restart",
        ),
        (
            today_job("", "").replacen("    network {\n", "    network {\n      mtu = 1500\n", 1),
            "mtu",
            "network.mtu",
            "not a field of network",
        ),
        (
            today_job("", "").replacen(
                "    network {\n",
                "    network {\n      bridge {\n      }\n",
                1,
            ),
            "bridge",
            "network.bridge",
            "not a block of network",
        ),
        (
            today_job("", "").replace("static = 18080", "static = 18080\n        label = \"x\""),
            "label",
            "network.port \"http\".label",
            "not a field of a port",
        ),
        (
            today_job("", "").replacen("  group \"g\" {\n", "  group \"g\" {\n    weight = 1\n", 1),
            "weight",
            "group.weight",
            "not a field of a group",
        ),
        (
            today_job("", "").replacen("job \"j\" {\n", "job \"j\" {\n  owner = \"me\"\n", 1),
            "owner",
            "job.owner",
            "not a field of a job",
        ),
        (
            format!("x = 1\n{}", today_job("", "")),
            "x = 1",
            "x",
            "not part of a job file",
        ),
        (
            job_with_task(&format!(
                "      config {{\n        image_source = \"http://h/x.iso\"\n        checksum = \"{MD5}\"\n        guest_port = 80\n      }}"
            )),
            "guest_port",
            "config.host_port",
            "is required with guest_port",
        ),
    ];
    for (text, needle, field, why) in cases {
        refused(&text, needle, field, why);
    }
}

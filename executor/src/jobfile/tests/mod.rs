//! The mapping, field by field: job files as users write them, parsed and
//! mapped, the result compared with the task a task file would give.

mod errors;
mod warnings;

use policy_sdk::{
    Accelerator, Checksum, DriveInterface, PortMapping, Protocol, ReadyCheck, RestartMode,
    RestartPolicy, Task,
};

use super::*;

const MD5: &str = "0123456789abcdef0123456789abcdef";
const ORIGINAL: &str = include_str!("../../../../tests/data/jobs/original.nomad");
const TODAY: &str = include_str!("../../../../tests/data/jobs/today.nomad");

/// A job with one group, a static `http` port 18080, and the qemu task
/// `web`, whose body is `task_body`.
fn job_with_task(task_body: &str) -> String {
    format!(
        "job \"j\" {{\n  group \"g\" {{\n    network {{\n      port \"http\" {{\n        static = 18080\n      }}\n    }}\n    task \"web\" {{\n      driver = \"qemu\"\n{task_body}\n    }}\n  }}\n}}\n"
    )
}

/// Today's generation with an artifact, plus `config_extra` inside
/// config and `task_extra` after it.
fn today_job(config_extra: &str, task_extra: &str) -> String {
    job_with_task(&format!(
        "      artifact {{\n        source = \"http://h/linux.img\"\n        options {{\n          checksum = \"md5:{MD5}\"\n        }}\n      }}\n      config {{\n        image_path = \"local/linux.img\"\n        port_map {{\n          http = 8080\n        }}\n{config_extra}\n      }}\n{task_extra}"
    ))
}

fn ok(text: &str) -> Converted {
    convert(text, None).unwrap_or_else(|e| panic!("{e}\n---\n{text}"))
}

fn task(text: &str) -> Task {
    ok(text).task
}

/// The line of the only line of `text` that contains `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let found: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(found.len(), 1, "{needle:?} is on lines {found:?}");
    found[0]
}

fn warnings(text: &str) -> Vec<(usize, String)> {
    ok(text)
        .warnings
        .into_iter()
        .map(|w| (w.line, w.field))
        .collect()
}

fn port(host: u16, guest: u16, protocol: Protocol, check: ReadyCheck) -> PortMapping {
    PortMapping {
        host,
        guest,
        protocol,
        host_ip: "127.0.0.1".into(),
        check,
        http_path: "/".into(),
    }
}

#[test]
fn original_generation_example() {
    let converted = ok(ORIGINAL);
    assert_eq!(
        (
            converted.job.as_str(),
            converted.group.as_str(),
            converted.task_name.as_str()
        ),
        ("my-service", "webs", "linux")
    );
    assert_eq!(
        converted.task,
        Task {
            name: "linux".into(),
            image_source: "http://www.example.com/artifacts/linux-0.1.iso".into(),
            checksum: "md5:a5e836985934c3392cbbd9b643e5c1f7".parse().unwrap(),
            accelerator: Accelerator::Kvm,
            kvm_fallback: true,
            ports: vec![port(8080, 8081, Protocol::Tcp, ReadyCheck::None)],
            memory_mb: 512,
            cpus: 1,
            kill_timeout_s: 5,
            ready_timeout_s: 300,
            ready_serial: None,
            machine_type: "pc".into(),
            drive_interface: DriveInterface::Ide,
            graceful_shutdown: false,
            args: vec![],
            restart: RestartPolicy {
                attempts: 2,
                interval_s: 1800,
                delay_s: 15,
                mode: RestartMode::Fail,
            },
        }
    );
    let ignored: Vec<String> = converted.warnings.iter().map(|w| w.field.clone()).collect();
    assert_eq!(
        ignored,
        [
            "job.region",
            "job.datacenters",
            "job.priority",
            "job.constraint",
            "job.update",
            "group.count",
            "resources.cpu",
            "network.mbits"
        ]
    );
    assert_eq!(converted.warnings[0].line, line_of(ORIGINAL, "region"));
    assert_eq!(converted.warnings[6].line, line_of(ORIGINAL, "cpu "));
}

#[test]
fn todays_generation_example() {
    let converted = ok(TODAY);
    let mut http = port(8080, 8080, Protocol::Tcp, ReadyCheck::Http);
    http.http_path = "/".into();
    assert_eq!(
        converted.task,
        Task {
            name: "virtual".into(),
            image_source: "https://internal.file.server/linux.img".into(),
            checksum: "md5:df6a4178aec9fbdc1d6d7e3634d1bc33".parse().unwrap(),
            accelerator: Accelerator::Kvm,
            kvm_fallback: true,
            ports: vec![
                port(2222, 22, Protocol::Tcp, ReadyCheck::None),
                port(2222, 22, Protocol::Udp, ReadyCheck::None),
                http,
                port(8080, 8080, Protocol::Udp, ReadyCheck::None),
            ],
            memory_mb: 1024,
            cpus: 2,
            kill_timeout_s: 30,
            ready_timeout_s: 300,
            ready_serial: None,
            machine_type: "pc".into(),
            drive_interface: DriveInterface::Ide,
            graceful_shutdown: true,
            args: vec!["-nodefaults".into(), "-nodefconfig".into()],
            restart: RestartPolicy {
                attempts: 3,
                interval_s: 300,
                delay_s: 25,
                mode: RestartMode::Delay,
            },
        }
    );
    let ignored: Vec<&str> = converted
        .warnings
        .iter()
        .map(|w| w.field.as_str())
        .collect();
    assert_eq!(ignored, ["job.datacenters", "group.count", "service"]);
}

#[test]
fn printed_task_files_read_back_to_the_same_task() {
    for text in [ORIGINAL, TODAY, &today_job("", "")] {
        let converted = ok(text);
        let toml = to_toml(&converted.task);
        let back = crate::task::parse_toml(&toml)
            .unwrap_or_else(|e| panic!("{e}\n{toml}"))
            .into_task()
            .unwrap();
        assert_eq!(back, converted.task, "{toml}");

        let loaded = Loaded {
            task: converted.task.clone(),
            warnings: converted.warnings.clone(),
            origin: None,
        };
        let file = converted_file(&loaded, "job.nomad");
        let back = crate::task::parse_toml(&file).unwrap().into_task().unwrap();
        assert_eq!(back, converted.task);
        for w in &converted.warnings {
            assert!(file.contains(&format!("#   {w}\n")), "{file}");
        }
    }
}

#[test]
fn scheduler_defaults() {
    let t = task(&today_job("", ""));
    assert_eq!(t.accelerator, Accelerator::Tcg);
    assert_eq!(t.drive_interface, DriveInterface::Ide);
    assert_eq!(t.kill_timeout_s, 5);
    assert!(!t.graceful_shutdown);
    assert_eq!(t.memory_mb, 300);
    assert_eq!(t.cpus, 1);
    assert_eq!(t.machine_type, "pc");
    assert!(t.args.is_empty());
    // Ours, where the scheduler has nothing to say.
    assert!(t.kvm_fallback);
    assert_eq!(t.ready_timeout_s, 300);
    assert_eq!(t.ready_serial, None);
    assert_eq!(t.restart, RestartPolicy::default());
    assert_eq!(t.restart.attempts, 2);

    for job_type in ["batch", "sysbatch"] {
        let text = today_job("", "").replacen(
            "job \"j\" {\n",
            &format!("job \"j\" {{\n  type = \"{job_type}\"\n"),
            1,
        );
        let r = task(&text).restart;
        assert_eq!((r.attempts, r.interval_s, r.delay_s), (3, 86_400, 15));
        assert_eq!(r.mode, RestartMode::Fail);
    }
    let system =
        today_job("", "").replacen("job \"j\" {\n", "job \"j\" {\n  type = \"system\"\n", 1);
    assert_eq!(task(&system).restart, RestartPolicy::default());
}

#[test]
fn config_fields() {
    let t = task(&today_job(
        "        accelerator = \"kvm\"\n        graceful_shutdown = true\n        guest_agent = false\n        args = [\"-rtc\", \"base=utc\"]\n        drive_interface = \"virtio\"\n        machine_type = \"q35\"\n        emulator = \"qemu-system-x86_64\"",
        "",
    ));
    assert_eq!(t.accelerator, Accelerator::Kvm);
    assert!(t.graceful_shutdown);
    assert_eq!(t.args, ["-rtc", "base=utc"]);
    assert_eq!(t.drive_interface, DriveInterface::Virtio);
    assert_eq!(t.machine_type, "q35");
    let t = task(&today_job(
        "        accelerator = \"tcg\"\n        graceful_shutdown = \"true\"",
        "",
    ));
    assert_eq!(t.accelerator, Accelerator::Tcg);
    assert!(t.graceful_shutdown, "the old driver's string bools");
}

#[test]
fn original_values_as_strings_or_numbers() {
    let config = |extra: &str| {
        job_with_task(&format!(
            "      config {{\n        image_source = \"http://h/x.iso\"\n        checksum = \"{}\"\n{extra}\n      }}",
            MD5.to_uppercase()
        ))
    };
    for pair in [
        "        host_port = \"8080\"\n        guest_port = \"80\"",
        "        host_port = 8080\n        guest_port = 80",
        "        host_port = \" 8080\"\n        guest_port = 80",
    ] {
        let t = task(&config(pair));
        assert_eq!(
            t.ports,
            [port(8080, 80, Protocol::Tcp, ReadyCheck::None)],
            "{pair}"
        );
        assert_eq!(
            t.checksum.to_string(),
            format!("md5:{MD5}"),
            "bare MD5, any case"
        );
    }
    // The group's unused static port is only reserved by the scheduler.
    let w = warnings(&config("        host_port = 1\n        guest_port = 2"));
    assert_eq!(w, [(4, "network.port \"http\"".to_string())]);
}

#[test]
fn port_map_forms_and_checks() {
    let job = |config_ports: &str, extra_group: &str| {
        format!(
            "job \"j\" {{\n  group \"g\" {{\n    network {{\n      port \"http\" {{\n        static = 18080\n      }}\n      port \"ssh\" {{\n        static = 2222\n      }}\n    }}\n{extra_group}\n    task \"web\" {{\n      driver = \"qemu\"\n      config {{\n        image_source = \"http://h/x.iso\"\n        checksum = \"{MD5}\"\n{config_ports}\n      }}\n    }}\n  }}\n}}\n"
        )
    };
    let block = task(&job(
        "        port_map {\n          http = 80\n          ssh = \"22\"\n        }",
        "",
    ));
    let object = task(&job("        port_map = { http = 80, ssh = 22 }", ""));
    let list = task(&job("        port_map = [{ http = 80 }, { ssh = 22 }]", ""));
    let expected = vec![
        port(18080, 80, Protocol::Tcp, ReadyCheck::None),
        port(18080, 80, Protocol::Udp, ReadyCheck::None),
        port(2222, 22, Protocol::Tcp, ReadyCheck::None),
        port(2222, 22, Protocol::Udp, ReadyCheck::None),
    ];
    assert_eq!(block.ports, expected);
    assert_eq!(object.ports, expected);
    assert_eq!(list.ports, expected);

    // An http check on a port makes it a readiness check, at its path;
    // a check's own port wins over the service's; tcp and https checks
    // are not readiness checks here.
    let services = "    service {\n      port = \"ssh\"\n      check {\n        type = \"tcp\"\n      }\n      check {\n        type = \"http\"\n        port = \"http\"\n        path = \"/health\"\n      }\n    }\n    service {\n      port = \"ssh\"\n      check {\n        type = \"http\"\n        protocol = \"https\"\n      }\n    }";
    let t = task(&job("        port_map = { http = 80, ssh = 22 }", services));
    assert_eq!(t.ports[0].check, ReadyCheck::Http);
    assert_eq!(t.ports[0].http_path, "/health");
    assert_eq!(t.ports[1].check, ReadyCheck::None, "udp is never checked");
    assert_eq!(t.ports[2].check, ReadyCheck::None);
}

#[test]
fn networks_of_group_task_and_resources_join() {
    let text = job_with_task(&format!(
        "      network {{\n        port \"a\" {{\n          static = 7001\n        }}\n      }}\n      resources {{\n        network {{\n          port \"b\" {{\n            static = 7002\n          }}\n        }}\n      }}\n      config {{\n        image_source = \"http://h/x.iso\"\n        checksum = \"{MD5}\"\n        port_map = {{ http = 1, a = 2, b = 3 }}\n      }}"
    ));
    let hosts: Vec<(u16, u16)> = task(&text)
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .map(|p| (p.host, p.guest))
        .collect();
    assert_eq!(hosts, [(18080, 1), (7001, 2), (7002, 3)]);
}

#[test]
fn resources() {
    let t = task(&today_job(
        "",
        "      resources {\n        memory = \"2048\"\n        cores = 4\n      }",
    ));
    assert_eq!((t.memory_mb, t.cpus), (2048, 4));

    let text = today_job(
        "",
        "      resources {\n        cpu = 500\n        memory = 256\n        memory_max = 512\n      }",
    );
    let t = task(&text);
    assert_eq!((t.memory_mb, t.cpus), (256, 1), "MHz is not a vCPU count");
    assert_eq!(
        warnings(&text),
        [
            (line_of(&text, "cpu ="), "resources.cpu".to_string()),
            (
                line_of(&text, "memory_max"),
                "resources.memory_max".to_string()
            ),
        ]
    );
}

#[test]
fn restart_merges_group_then_task_over_the_defaults() {
    let text = today_job("", "      restart {\n        delay = \"1m\"\n      }").replacen(
        "  group \"g\" {\n",
        "  group \"g\" {\n    restart {\n      attempts = 5\n      delay = \"30s\"\n    }\n",
        1,
    );
    let r = task(&text).restart;
    assert_eq!(
        r,
        RestartPolicy {
            attempts: 5,
            interval_s: 1800,
            delay_s: 60,
            mode: RestartMode::Fail
        }
    );
}

#[test]
fn durations_in_whole_seconds() {
    for (written, secs) in [
        ("\"30s\"", 30),
        ("\"5m\"", 300),
        ("\"1m30s\"", 90),
        ("\"0s\"", 0),
    ] {
        let t = task(&today_job("", &format!("      kill_timeout = {written}")));
        assert_eq!(t.kill_timeout_s, secs, "{written}");
    }
    let text = today_job("", "      kill_timeout = \"2500ms\"");
    assert_eq!(task(&text).kill_timeout_s, 3, "rounded up, never shorter");
    let w = ok(&text).warnings;
    assert_eq!(w[0].field, "kill_timeout");
    assert!(
        w[0].message.contains("rounded up to 3s"),
        "{}",
        w[0].message
    );
}

#[test]
fn artifact_forms() {
    let job = |artifact: &str, image_path: &str| {
        job_with_task(&format!(
            "      artifact {{\n{artifact}\n      }}\n      config {{\n        image_path = \"{image_path}\"\n        port_map = {{ http = 80 }}\n      }}"
        ))
    };
    // Default destination local/, the file keeping its name.
    let t = task(&job(
        &format!(
            "        source = \"https://h/img/linux.qcow2\"\n        options {{\n          checksum = \"md5:{MD5}\"\n        }}"
        ),
        "./local/linux.qcow2",
    ));
    assert_eq!(t.image_source, "https://h/img/linux.qcow2");
    // The checksum as the fetcher reads it from the URL, removed from it.
    let sha = "a".repeat(64);
    let t = task(&job(
        &format!(
            "        source = \"https://h/linux.img?checksum=sha256:{sha}&x=1\"\n        destination = \"local/images/\""
        ),
        "local/images/linux.img",
    ));
    assert_eq!(t.image_source, "https://h/linux.img?x=1");
    assert_eq!(
        t.checksum,
        format!("sha256:{sha}").parse::<Checksum>().unwrap()
    );
    // options as an attribute; a compressed name fetched whole on request.
    let t = task(&job(
        &format!(
            "        source = \"file:///srv/linux.img.gz\"\n        options = {{ checksum = \"{MD5}\", archive = false }}"
        ),
        "local/linux.img.gz",
    ));
    assert_eq!(t.image_source, "file:///srv/linux.img.gz");
}

#[test]
fn picking_the_qemu_task() {
    let task_block = |name: &str, driver: &str| {
        format!(
            "    task \"{name}\" {{\n      driver = \"{driver}\"\n      config {{\n        image_source = \"http://h/x.iso\"\n        checksum = \"{MD5}\"\n        host_port = 1\n        guest_port = 2\n      }}\n    }}\n"
        )
    };
    let two = format!(
        "job \"j\" {{\n  group \"a\" {{\n{}{}  }}\n  group \"b\" {{\n{}{}  }}\n}}\n",
        task_block("web", "qemu"),
        task_block("proxy", "docker"),
        task_block("web", "qemu"),
        task_block("db", "qemu"),
    );
    let err = convert(&two, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Job \"j\" has 3 qemu tasks (a/web, b/web, b/db): choose one with --task NAME"
    );
    let err = convert(&two, Some("web")).unwrap_err();
    assert!(
        matches!(err, JobError::AmbiguousTask { count: 2, .. }),
        "{err}"
    );
    let picked = convert(&two, Some("b/web")).unwrap();
    assert_eq!(
        (picked.group.as_str(), picked.task_name.as_str()),
        ("b", "web")
    );
    let picked = convert(&two, Some("db")).unwrap();
    assert_eq!(picked.task.name, "db");
    // The others are named as not run.
    let not_run: Vec<&str> = picked
        .warnings
        .iter()
        .map(|w| w.field.as_str())
        .filter(|f| f.starts_with("task "))
        .collect();
    assert_eq!(
        not_run,
        ["task \"a/web\"", "task \"a/proxy\"", "task \"b/web\""]
    );
    let err = convert(&two, Some("proxy")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Job \"j\" has no qemu task \"proxy\" (its qemu tasks: a/web, b/web, b/db)"
    );

    let none = format!(
        "job \"j\" {{\n  group \"a\" {{\n{}  }}\n}}\n",
        task_block("proxy", "docker")
    );
    assert_eq!(
        convert(&none, None).unwrap_err().to_string(),
        "Job \"j\" has no task with driver = \"qemu\" (its tasks: a/proxy (docker))"
    );

    // The earliest jobs put tasks straight under the job.
    let bare = format!("job \"j\" {{\n{}}}\n", task_block("vm", "qemu"));
    let c = convert(&bare, None).unwrap();
    assert_eq!((c.group.as_str(), c.task.name.as_str()), ("vm", "vm"));
}

#[test]
fn loading_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["job.hcl", "job.nomad"] {
        let path = dir.path().join(name);
        std::fs::write(&path, ORIGINAL).unwrap();
        let loaded = load(&path, None).unwrap();
        assert_eq!(loaded.task.name, "linux");
        assert_eq!(loaded.origin.unwrap().job, "my-service");
        assert_eq!(load_task(&path, Some("linux")).unwrap(), loaded.task);
    }
    let toml = dir.path().join("t.toml");
    std::fs::write(&toml, to_toml(&ok(ORIGINAL).task)).unwrap();
    let loaded = load(&toml, None).unwrap();
    assert_eq!(loaded.task, ok(ORIGINAL).task);
    assert!(loaded.warnings.is_empty() && loaded.origin.is_none());
    let err = load(&toml, Some("linux")).unwrap_err();
    assert!(
        matches!(err, LoadError::TaskNameForTaskFile { .. }),
        "{err}"
    );

    let yaml = dir.path().join("t.yaml");
    std::fs::write(&yaml, "").unwrap();
    let err = load(&yaml, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("neither a task file (.toml, .json) nor a job file (.hcl, .nomad)")
    );
    let missing = dir.path().join("gone.nomad");
    assert!(matches!(load(&missing, None), Err(LoadError::Read { .. })));
    let bad = dir.path().join("bad.hcl");
    std::fs::write(&bad, "job \"x\" {\n").unwrap();
    let err = load(&bad, None).unwrap_err();
    assert!(
        matches!(
            &err,
            LoadError::Job {
                source: JobError::Syntax { .. },
                ..
            }
        ),
        "{err}"
    );
}

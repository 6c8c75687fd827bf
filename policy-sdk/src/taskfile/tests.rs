use super::*;
use crate::{Accelerator, Protocol, ReadyCheck};

fn parse_toml(text: &str) -> Result<TaskFile, toml::de::Error> {
    toml::from_str(text)
}

fn parse_json(text: &str) -> Result<TaskFile, serde_json::Error> {
    serde_json::from_str(text)
}

const MD5: &str = "0123456789abcdef0123456789abcdef";

fn toml_task(extra: &str) -> Result<Task, FieldErrors> {
    let text = format!(
        "name = \"web\"\nimage_source = \"http://127.0.0.1:8000/guest.iso\"\nchecksum = \"md5:{MD5}\"\n{extra}"
    );
    parse_toml(&text).expect("parses").into_task()
}

fn fields(result: Result<Task, FieldErrors>) -> Vec<String> {
    result
        .expect_err("must be refused")
        .0
        .into_iter()
        .map(|e| e.field)
        .collect()
}

#[test]
fn issue_example_with_defaults() {
    let task = toml_task("host_port = 18080\nguest_port = 8080\n").unwrap();
    assert_eq!(task.accelerator, Accelerator::Tcg);
    assert_eq!(task.memory_mb, 512);
    assert_eq!(task.cpus, 1);
    assert_eq!(task.kill_timeout_s, 30);
    assert!(task.kvm_fallback);
    assert!(task.graceful_shutdown);
    assert_eq!(task.machine_type, "pc");
    assert_eq!(task.ports, vec![default_port(18080, 8080)]);
    assert_eq!(task.checksum.to_string(), format!("md5:{MD5}"));
}

#[test]
fn full_example_from_the_docs() {
    let task = toml_task(
        "accelerator = \"kvm\"\nhost_port = 18080\nguest_port = 8080\nmemory_mb = 256\ncpus = 1\nkill_timeout_s = 30\n",
    )
    .unwrap();
    assert_eq!(task.accelerator, Accelerator::Kvm);
    assert_eq!(task.memory_mb, 256);
}

#[test]
fn ports_list_and_pair_combine() {
    let task = toml_task(
        "host_port = 18080\nguest_port = 8080\n[[ports]]\nhost = 5353\nguest = 53\nprotocol = \"udp\"\nhost_ip = \"0.0.0.0\"\n",
    )
    .unwrap();
    assert_eq!(task.ports.len(), 2);
    assert_eq!(task.ports[1].protocol, Protocol::Udp);
    assert_eq!(task.ports[1].check, ReadyCheck::None);
    assert_eq!(task.ports[1].host_ip, "0.0.0.0");
}

#[test]
fn json_has_the_same_fields() {
    let text = format!(
        r#"{{"name":"web","image_source":"http://h/guest.iso","checksum":"{MD5}","host_port":18080,"guest_port":8080}}"#
    );
    let task = parse_json(&text).unwrap().into_task().unwrap();
    assert_eq!(task.ports[0].host, 18080);
}

#[test]
fn unknown_field_is_named() {
    let err = parse_toml(&format!(
        "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\nhost_prot = 1\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("host_prot"), "{err}");
    let err = parse_json(&format!(
        r#"{{"name":"web","image_source":"http://h/x","checksum":"{MD5}","memory":1}}"#
    ))
    .unwrap_err();
    assert!(err.to_string().contains("memory"), "{err}");
}

#[test]
fn missing_required_fields_are_named() {
    let err = parse_toml("name = \"web\"\nchecksum = \"x\"\n").unwrap_err();
    assert!(err.to_string().contains("image_source"), "{err}");
    let err = parse_toml("name = \"web\"\nimage_source = \"http://h/x\"\n").unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    let err = parse_json(r#"{"image_source":"http://h/x","checksum":"x"}"#).unwrap_err();
    assert!(err.to_string().contains("name"), "{err}");
    assert_eq!(fields(toml_task("")), ["host_port"]);
    assert_eq!(fields(toml_task("host_port = 1\n")), ["guest_port"]);
    assert_eq!(fields(toml_task("guest_port = 1\n")), ["host_port"]);
}

#[test]
fn out_of_range_values_are_named() {
    let pair = "host_port = 18080\nguest_port = 8080\n";
    let cases = [
        ("memory_mb = 4\n", "memory_mb"),
        ("memory_mb = 99999999\n", "memory_mb"),
        ("cpus = 0\n", "cpus"),
        ("cpus = 1000\n", "cpus"),
        ("kill_timeout_s = -1\n", "kill_timeout_s"),
        ("ready_timeout_s = 0\n", "ready_timeout_s"),
        ("[restart]\nattempts = -3\n", "restart.attempts"),
        ("[restart]\ninterval_s = 0\n", "restart.interval_s"),
    ];
    for (extra, field) in cases {
        assert_eq!(
            fields(toml_task(&format!("{pair}{extra}"))),
            [field],
            "{extra}"
        );
    }
    assert_eq!(
        fields(toml_task("host_port = 70000\nguest_port = 8080\n")),
        ["host_port"]
    );
    assert_eq!(
        fields(toml_task("host_port = 1\nguest_port = 0\n")),
        ["guest_port"]
    );
    assert_eq!(
        fields(toml_task("[[ports]]\nhost = 1\nguest = 65536\n")),
        ["ports[0].guest"]
    );
}

#[test]
fn bad_values_are_named() {
    let pair = "host_port = 18080\nguest_port = 8080\n";
    let err = parse_toml(&format!(
        "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\naccelerator = \"hvf\"\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("accelerator"), "{err}");

    let bad_checksum = parse_toml(&format!(
        "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"crc:1\"\n{pair}"
    ))
    .unwrap()
    .into_task();
    assert_eq!(fields(bad_checksum), ["checksum"]);

    for (source, ok) in [
        ("ftp://h/x.iso", false),
        ("not a url", false),
        ("file:///var/images/x.iso", true),
        ("https://example.com/x.qcow2", true),
        ("file:///", false),
    ] {
        let text =
            format!("name = \"web\"\nimage_source = \"{source}\"\nchecksum = \"{MD5}\"\n{pair}");
        let result = parse_toml(&text).unwrap().into_task();
        assert_eq!(result.is_ok(), ok, "{source}");
        if !ok {
            assert_eq!(fields(result), ["image_source"]);
        }
    }
}

#[test]
fn names_cannot_escape_or_inject() {
    for bad in [
        "",
        "../etc",
        "a/b",
        "/abs",
        ".hidden",
        "-rf",
        "web,file=/etc/passwd",
        "a=b",
        "new\nline",
        "nul\0",
        "$(reboot)",
        "semi;colon",
        &"x".repeat(65),
    ] {
        assert!(check_name(bad).is_err(), "{bad:?} must be refused");
    }
    for good in ["web", "web-1", "a.b_c", "X9"] {
        assert!(check_name(good).is_ok(), "{good:?}");
    }
}

#[test]
fn port_problems() {
    assert_eq!(
        fields(toml_task(
            "[[ports]]\nhost = 1\nguest = 2\nhost_ip = \"::1\"\n"
        )),
        ["ports[0].host_ip"]
    );
    assert_eq!(
        fields(toml_task(
            "host_port = 8080\nguest_port = 80\n[[ports]]\nhost = 8080\nguest = 81\n"
        )),
        ["ports[1].host"]
    );
    assert_eq!(
        fields(toml_task(
            "[[ports]]\nhost = 1\nguest = 2\nhttp_path = \"/x HTTP/1.1\\r\\nHost: y\"\n"
        )),
        ["ports[0].http_path"]
    );
    assert_eq!(
        fields(toml_task(
            "[[ports]]\nhost = 1\nguest = 2\nprotocol = \"udp\"\ncheck = \"http\"\n"
        )),
        ["ports[0].check"]
    );
    let err = parse_toml(&format!(
        "name = \"web\"\nimage_source = \"http://h/x\"\nchecksum = \"{MD5}\"\n[[ports]]\nhost = 1\nguest = 2\nproto = \"tcp\"\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("proto"), "{err}");
}

#[test]
fn machine_type_cannot_carry_options() {
    assert_eq!(
        fields(toml_task(
            "host_port = 1\nguest_port = 2\nmachine_type = \"pc,accel=kvm\"\n"
        )),
        ["machine_type"]
    );
}

#[test]
fn several_problems_are_reported_together() {
    let got = fields(toml_task(
        "host_port = 1\nguest_port = 2\nmemory_mb = 1\ncpus = 0\n",
    ));
    assert_eq!(got, ["memory_mb", "cpus"]);
}

#[test]
fn validate_rejects_what_a_policy_could_produce() {
    let mut task = toml_task("host_port = 18080\nguest_port = 8080\n").unwrap();
    assert!(validate(&task).is_ok());
    task.ports.clear();
    task.memory_mb = 0;
    task.checksum.digest = "XYZ".into();
    let got: Vec<_> = validate(&task)
        .unwrap_err()
        .0
        .into_iter()
        .map(|e| e.field)
        .collect();
    assert_eq!(got, ["checksum", "ports", "memory_mb"]);
}

#[test]
fn control_characters_are_refused_in_every_string_field() {
    // The URL parser drops tabs and newlines without a word, so this one
    // would pass a URL check alone.
    let mut task = toml_task("host_port = 8080\nguest_port = 80\n").unwrap();
    task.image_source = "http://127.0.0.1/x\nHost: evil".into();
    task.ready_serial = Some("login:\u{1b}[2J".into());
    task.args = vec!["-smbios".into(), "type=1,product=a\u{7}".into()];
    task.ports[0].http_path = "/\u{9b}".into();
    task.ports[0].host_ip = "127.0.0.1\u{0}".into();
    task.machine_type = "pc\t".into();
    task.name = "web\u{7f}".into();
    let err = crate::taskfile::validate(&task).unwrap_err();
    let named: Vec<&str> = err.0.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        named,
        [
            "name",
            "image_source",
            "ports[0].host_ip",
            "ports[0].http_path",
            "ready_serial",
            "machine_type",
            "args[1]"
        ]
    );
    let message = err.to_string();
    assert!(!message.contains(char::is_control), "{message:?}");
    assert!(
        message.contains(
            "image_source: \"http://127.0.0.1/x\\nHost: evil\" must not contain control characters"
        ),
        "{message}"
    );
}

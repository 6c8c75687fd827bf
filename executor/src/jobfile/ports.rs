//! Ports: the original driver's `host_port`/`guest_port` pair, or today's
//! `port_map { label = guest_port }` joined with the group's or task's
//! `network { port "label" { static = N } }`. A port is checked for
//! readiness only when a `service` check of type http names it, as the
//! scheduler reports a qemu task running once qemu starts.

use std::collections::BTreeMap;

use policy_sdk::{Protocol, ReadyCheck};

use super::hcl::{self, Attr, Block};
use super::mapping::Ctx;
use crate::task::PortFile;

/// One `port_map` entry: a network port label and the guest port.
pub struct PortMapEntry {
    pub label: String,
    pub guest: i64,
    pub line: usize,
}

/// The original driver's pair, with lines.
#[derive(Default)]
pub struct PortPair {
    pub host: Option<(i64, usize)>,
    pub guest: Option<(i64, usize)>,
}

/// `port_map = { ssh = 22 }` or `port_map = [{ ssh = 22 }]` (the list of
/// maps the driver's schema declares).
pub fn port_map_attr(ctx: &mut Ctx, attr: &Attr) -> Vec<PortMapEntry> {
    let Some(value) = ctx.read(attr, "config.port_map", Attr::value) else {
        return Vec::new();
    };
    let maps = match value {
        hcl::Value::Array(items) => items,
        other => vec![other],
    };
    let mut out = Vec::new();
    for map in maps {
        let hcl::Value::Object(map) = map else {
            ctx.problem(
                attr.line,
                "config.port_map",
                "expected a map of port labels to guest ports, like { ssh = 22 }",
            );
            continue;
        };
        for (label, guest) in map {
            match hcl::as_int(&guest) {
                Ok(guest) => out.push(PortMapEntry {
                    label,
                    guest,
                    line: attr.line,
                }),
                Err(e) => ctx.problem(attr.line, format!("config.port_map.{label}"), e),
            }
        }
    }
    out
}

/// `port_map { ssh = 22 }`, each entry on its own line.
pub fn port_map_block(ctx: &mut Ctx, block: &Block) -> Vec<PortMapEntry> {
    for inner in &block.blocks {
        ctx.problem(
            inner.line,
            format!("config.port_map.{}", inner.ident),
            "expected label = guest_port",
        );
    }
    block
        .attrs
        .iter()
        .filter_map(|attr| {
            let field = format!("config.port_map.{}", attr.key);
            ctx.read(attr, &field, Attr::int).map(|guest| PortMapEntry {
                label: attr.key.clone(),
                guest,
                line: attr.line,
            })
        })
        .collect()
}

/// A port of a `network` block.
struct NetPort {
    label: String,
    static_port: Option<i64>,
    line: usize,
    used: bool,
}

pub fn resolve(
    ctx: &mut Ctx,
    config_line: usize,
    entries: &[PortMapEntry],
    networks: &[&Block],
    services: &[&Block],
    pair: PortPair,
) -> Vec<PortFile> {
    let mut net = read_networks(ctx, networks);
    let checks = http_checks(ctx, services);
    let mut out = Vec::new();

    match (pair.host, pair.guest) {
        (Some((host, line)), Some((guest, _))) => {
            ctx.origin(format!("ports[{}]", out.len()), line, "config.host_port");
            out.push(port(host, guest, Protocol::Tcp, None));
        }
        (Some((_, line)), None) => {
            ctx.problem(line, "config.guest_port", "is required with host_port");
        }
        (None, Some((_, line))) => {
            ctx.problem(line, "config.host_port", "is required with guest_port");
        }
        (None, None) => {}
    }

    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in entries {
        let field = format!("config.port_map.{}", entry.label);
        if let Some(first) = seen.insert(&entry.label, entry.line) {
            ctx.problem(
                entry.line,
                field,
                format!("is mapped twice (first at line {first})"),
            );
            continue;
        }
        let Some(np) = net.iter_mut().find(|p| p.label == entry.label) else {
            ctx.problem(
                entry.line,
                field,
                format!(
                    "names no network port; declare network {{ port {:?} {{ static = N }} }} in the group",
                    entry.label
                ),
            );
            continue;
        };
        np.used = true;
        let Some(host) = np.static_port else {
            ctx.problem(
                np.line,
                format!("network.port {:?}", entry.label),
                "has no static number: dynamic ports are not supported here (nothing assigns them outside the scheduler); give static = N",
            );
            continue;
        };
        let check = checks.get(&entry.label).cloned();
        // As the scheduler's driver does, each mapped port is forwarded
        // for TCP and for UDP.
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            ctx.origin(format!("ports[{}]", out.len()), entry.line, field.clone());
            let path = check.clone().filter(|_| protocol == Protocol::Tcp);
            out.push(port(host, entry.guest, protocol, path));
        }
    }

    for np in net.iter().filter(|p| !p.used) {
        ctx.warn(
            np.line,
            format!("network.port {:?}", np.label),
            "ignored: only ports named in config.port_map are forwarded to the guest",
        );
    }
    if out.is_empty() && ctx.problems.is_empty() {
        ctx.problem(
            config_line,
            "config.port_map",
            "the task forwards no port; this executor needs at least one (port_map with a static network port, or host_port and guest_port)",
        );
    }
    out
}

/// A forward; checked over HTTP at `http_path` when a service check says
/// so, else not checked.
fn port(host: i64, guest: i64, protocol: Protocol, http_path: Option<String>) -> PortFile {
    let check = if http_path.is_some() {
        ReadyCheck::Http
    } else {
        ReadyCheck::None
    };
    PortFile {
        host,
        guest,
        protocol: Some(protocol),
        host_ip: None,
        check: Some(check),
        http_path,
    }
}

fn read_networks(ctx: &mut Ctx, networks: &[&Block]) -> Vec<NetPort> {
    let mut ports: Vec<NetPort> = Vec::new();
    for network in networks {
        for attr in &network.attrs {
            let field = format!("network.{}", attr.key);
            match attr.key.as_str() {
                "mode" => match ctx.read(attr, &field, Attr::string).as_deref() {
                    Some("host") | None => {}
                    Some(other) => ctx.problem(
                        attr.line,
                        field,
                        format!(
                            "{other:?} is not supported: ports are forwarded from the host by qemu (mode = \"host\")"
                        ),
                    ),
                },
                "mbits" | "reserved_ports" | "dynamic_ports" | "hostname" => ctx.warn(
                    attr.line,
                    field,
                    "ignored: a reservation of the scheduler; nothing is reserved here",
                ),
                other => ctx.problem(
                    attr.line,
                    field,
                    format!("{other:?} is not a field of network (mode, port)"),
                ),
            }
        }
        for block in &network.blocks {
            match block.ident.as_str() {
                "port" => {
                    let label = block.label().to_string();
                    if let Some(first) = ports.iter().find(|p| p.label == label) {
                        ctx.problem(
                            block.line,
                            format!("network.port {label:?}"),
                            format!("is declared twice (first at line {})", first.line),
                        );
                        continue;
                    }
                    let static_port = read_port(ctx, block, &label);
                    ports.push(NetPort {
                        label,
                        static_port,
                        line: block.line,
                        used: false,
                    });
                }
                "dns" => ctx.warn(
                    block.line,
                    "network.dns",
                    "ignored: the guest gets qemu's user-mode DNS",
                ),
                other => ctx.problem(
                    block.line,
                    format!("network.{other}"),
                    "not a block of network (port)",
                ),
            }
        }
    }
    ports
}

fn read_port(ctx: &mut Ctx, block: &Block, label: &str) -> Option<i64> {
    let mut static_port = None;
    for attr in &block.attrs {
        let field = format!("network.port {label:?}.{}", attr.key);
        match attr.key.as_str() {
            "static" => static_port = ctx.read(attr, &field, Attr::int),
            "to" => ctx.warn(
                attr.line,
                field,
                "ignored: the guest port comes from config.port_map",
            ),
            "host_network" | "ignore_collision" => ctx.warn(
                attr.line,
                field,
                "ignored: forwards listen on 127.0.0.1 here; edit host_ip in the task file to publish",
            ),
            other => ctx.problem(
                attr.line,
                field,
                format!("{other:?} is not a field of a port (static, to)"),
            ),
        }
    }
    static_port
}

/// Port label → the path of the first http check that names it.
fn http_checks(ctx: &mut Ctx, services: &[&Block]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for service in services {
        ctx.warn(
            service.line,
            "service",
            "registration ignored: its http checks become readiness checks of their ports",
        );
        let service_port = service.attr("port").and_then(|a| a.string().ok());
        for check in service.blocks_named("check") {
            let get = |k: &str| check.attr(k).and_then(|a| a.string().ok());
            if get("type").as_deref() != Some("http") || get("protocol").as_deref() == Some("https")
            {
                continue;
            }
            let Some(label) = get("port").or_else(|| service_port.clone()) else {
                continue;
            };
            let path = get("path").unwrap_or_else(|| "/".to_string());
            out.entry(label).or_insert(path);
        }
    }
    out
}

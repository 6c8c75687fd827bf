//! The qemu command line, built by pure functions.
//!
//! qemu splits option strings at commas, and a literal comma is written as
//! two. Every path and name that reaches an option string goes through
//! [`escape`], so no task field, cache path or state path can add an option.
//! Values that could carry a second option in any other way (machine types,
//! host addresses) are validated before they get here.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use policy_sdk::{Accelerator, DriveInterface, PortMapping};

/// The network card the guest sees; e1000 has drivers in every guest.
const NIC_MODEL: &str = "e1000";
/// What `-sandbox` forbids qemu once it runs.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// The sandbox when qemu drops to another user with `-runas`. qemu 7.2
/// installs its seccomp filter before `-runas` switches user, so with
/// `elevateprivileges=deny` the switch itself is killed (SIGSYS, exit 159).
/// Once `-runas` has switched the real, effective and saved ids and qemu
/// has no capabilities left, set*id calls cannot raise anything, and
/// `spawn=deny` keeps setuid programs out of reach.
pub const SANDBOX_RUNAS: &str =
    "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("Path {0:?} is not absolute")]
    RelativePath(PathBuf),
    #[error("Path {0:?} contains a newline or NUL")]
    UnsafePath(PathBuf),
}

/// Image formats qemu is told about explicitly, never left to probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// What the guest boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootMedium {
    /// An ISO, attached read-only: the cached file itself.
    Cdrom { path: PathBuf },
    /// A disk: the task's own copy-on-write overlay over the cached image.
    Disk {
        path: PathBuf,
        format: DiskFormat,
        interface: DriveInterface,
    },
}

/// Confinement qemu applies to itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confinement {
    /// `-sandbox on,...`: seccomp filters against obsolete, privileged and
    /// process-spawning system calls.
    pub sandbox: bool,
    /// `-chroot DIR` (qemu 7.2; newer releases spell it `-run-with`).
    pub chroot: Option<PathBuf>,
    /// `-runas USER`.
    pub runas: Option<String>,
}

impl Confinement {
    /// The `-sandbox` option string this confinement needs.
    pub fn sandbox_options(&self) -> &'static str {
        if self.runas.is_some() {
            SANDBOX_RUNAS
        } else {
            SANDBOX
        }
    }
}

/// Everything that goes into one qemu command line.
#[derive(Debug, Clone)]
pub struct QemuCommand<'a> {
    pub name: &'a str,
    pub machine_type: &'a str,
    pub accelerator: Accelerator,
    pub memory_mb: u32,
    pub cpus: u32,
    pub medium: BootMedium,
    pub ports: &'a [PortMapping],
    pub qmp_socket: &'a Path,
    pub serial_log: &'a Path,
    /// Operator-allowed passthrough arguments, already checked.
    pub extra_args: &'a [String],
    pub confinement: Confinement,
}

/// Doubles every comma, the escape qemu's option parser understands.
pub fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn checked_path(path: &Path) -> Result<OsString, CmdlineError> {
    if !path.is_absolute() {
        return Err(CmdlineError::RelativePath(path.to_path_buf()));
    }
    if path
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|&b| b == b'\n' || b == 0)
    {
        return Err(CmdlineError::UnsafePath(path.to_path_buf()));
    }
    Ok(escape(path.as_os_str()))
}

/// `key=` followed by an escaped path, as one option-string piece.
fn path_opt(prefix: &str, path: &Path) -> Result<OsString, CmdlineError> {
    let mut s = OsString::from(prefix);
    s.push(checked_path(path)?);
    Ok(s)
}

/// `hostfwd=tcp:127.0.0.1:18080-:8080` for each port.
pub fn hostfwd_rules(ports: &[PortMapping]) -> String {
    ports
        .iter()
        .map(|p| {
            format!(
                ",hostfwd={}:{}:{}-:{}",
                p.protocol, p.host_ip, p.host, p.guest
            )
        })
        .collect()
}

impl QemuCommand<'_> {
    /// The arguments after the program name.
    pub fn argv(&self) -> Result<Vec<OsString>, CmdlineError> {
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));

        push(&["-name"]);
        let mut name = OsString::from("guest=");
        name.push(escape(OsStr::new(self.name)));
        args.push(name);

        let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
        push(&["-machine", self.machine_type]);
        push(&["-accel", self.accelerator.as_str()]);
        push(&["-m", &self.memory_mb.to_string()]);
        push(&["-smp", &self.cpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);

        match &self.medium {
            BootMedium::Cdrom { path } => {
                let mut drive = path_opt("file=", path)?;
                drive.push(",if=ide,index=1,media=cdrom,readonly=on,format=raw");
                args.push("-drive".into());
                args.push(drive);
                args.extend(["-boot".into(), "order=d".into()]);
            }
            BootMedium::Disk {
                path,
                format,
                interface,
            } => {
                let mut drive = path_opt("file=", path)?;
                drive.push(format!(
                    ",if={},index=0,media=disk,format={}",
                    interface.as_str(),
                    format.as_str()
                ));
                args.push("-drive".into());
                args.push(drive);
                args.extend(["-boot".into(), "order=c".into()]);
            }
        }

        args.push("-netdev".into());
        args.push(format!("user,id=net0{}", hostfwd_rules(self.ports)).into());
        args.push("-device".into());
        args.push(format!("{NIC_MODEL},netdev=net0").into());

        args.push("-chardev".into());
        args.push(path_opt("file,id=serial0,path=", self.serial_log)?);
        args.extend(["-serial".into(), "chardev:serial0".into()]);

        args.push("-chardev".into());
        let mut qmp = path_opt("socket,id=qmp0,path=", self.qmp_socket)?;
        qmp.push(",server=on,wait=off");
        args.push(qmp);
        args.extend(["-mon".into(), "chardev=qmp0,mode=control".into()]);

        if self.confinement.sandbox {
            args.extend(["-sandbox".into(), self.confinement.sandbox_options().into()]);
        }
        if let Some(dir) = &self.confinement.chroot {
            args.push("-chroot".into());
            args.push(checked_path(dir)?);
        }
        if let Some(user) = &self.confinement.runas {
            args.extend(["-runas".into(), user.into()]);
        }

        args.extend(self.extra_args.iter().map(OsString::from));
        Ok(args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy_sdk::{Protocol, ReadyCheck};

    fn port(host: u16, guest: u16, protocol: Protocol) -> PortMapping {
        PortMapping {
            host,
            guest,
            protocol,
            host_ip: "127.0.0.1".into(),
            check: ReadyCheck::Http,
            http_path: "/".into(),
        }
    }

    fn command<'a>(ports: &'a [PortMapping], medium: BootMedium) -> QemuCommand<'a> {
        QemuCommand {
            name: "web",
            machine_type: "pc",
            accelerator: Accelerator::Tcg,
            memory_mb: 256,
            cpus: 2,
            medium,
            ports,
            qmp_socket: Path::new("/state/tasks/web/qmp.sock"),
            serial_log: Path::new("/state/tasks/web/serial.log"),
            extra_args: &[],
            confinement: Confinement::default(),
        }
    }

    fn strings(args: Vec<OsString>) -> Vec<String> {
        args.into_iter()
            .map(|a| a.into_string().expect("utf-8"))
            .collect()
    }

    /// The value that follows `flag` the `n`th time it appears.
    fn value_of(args: &[String], flag: &str, n: usize) -> String {
        args.iter()
            .enumerate()
            .filter(|(_, a)| *a == flag)
            .nth(n)
            .map(|(i, _)| args[i + 1].clone())
            .unwrap_or_else(|| panic!("{flag} #{n} missing in {args:?}"))
    }

    #[test]
    fn full_command_for_an_iso() {
        let ports = [
            port(18080, 8080, Protocol::Tcp),
            port(5353, 53, Protocol::Udp),
        ];
        let cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "/cache/images/md5-abc".into(),
            },
        );
        let args = strings(cmd.argv().unwrap());
        assert_eq!(
            args,
            [
                "-name",
                "guest=web",
                "-machine",
                "pc",
                "-accel",
                "tcg",
                "-m",
                "256",
                "-smp",
                "2",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-drive",
                "file=/cache/images/md5-abc,if=ide,index=1,media=cdrom,readonly=on,format=raw",
                "-boot",
                "order=d",
                "-netdev",
                "user,id=net0,hostfwd=tcp:127.0.0.1:18080-:8080,hostfwd=udp:127.0.0.1:5353-:53",
                "-device",
                "e1000,netdev=net0",
                "-chardev",
                "file,id=serial0,path=/state/tasks/web/serial.log",
                "-serial",
                "chardev:serial0",
                "-chardev",
                "socket,id=qmp0,path=/state/tasks/web/qmp.sock,server=on,wait=off",
                "-mon",
                "chardev=qmp0,mode=control",
            ]
        );
    }

    #[test]
    fn disk_gets_explicit_format_and_interface() {
        let ports = [port(2222, 22, Protocol::Tcp)];
        let mut cmd = command(
            &ports,
            BootMedium::Disk {
                path: "/t/disk.qcow2".into(),
                format: DiskFormat::Qcow2,
                interface: DriveInterface::Virtio,
            },
        );
        cmd.accelerator = Accelerator::Kvm;
        let args = strings(cmd.argv().unwrap());
        assert_eq!(
            value_of(&args, "-drive", 0),
            "file=/t/disk.qcow2,if=virtio,index=0,media=disk,format=qcow2"
        );
        assert_eq!(value_of(&args, "-boot", 0), "order=c");
        assert_eq!(value_of(&args, "-accel", 0), "kvm");
    }

    #[test]
    fn commas_in_paths_cannot_add_options() {
        let ports = [port(1, 2, Protocol::Tcp)];
        let mut cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "/cache,file=/etc/shadow/images/x".into(),
            },
        );
        let qmp = PathBuf::from("/s,server=off/qmp.sock");
        cmd.qmp_socket = &qmp;
        let args = strings(cmd.argv().unwrap());
        assert_eq!(
            value_of(&args, "-drive", 0),
            "file=/cache,,file=/etc/shadow/images/x,if=ide,index=1,media=cdrom,readonly=on,format=raw"
        );
        assert_eq!(
            value_of(&args, "-chardev", 1),
            "socket,id=qmp0,path=/s,,server=off/qmp.sock,server=on,wait=off"
        );
        // Each value still splits into exactly the options we wrote.
        let split = split_qemu_opts(&value_of(&args, "-drive", 0));
        assert_eq!(split[0], "file=/cache,file=/etc/shadow/images/x");
        assert_eq!(split.len(), 6);
    }

    #[test]
    fn name_is_escaped_too() {
        let ports = [port(1, 2, Protocol::Tcp)];
        let mut cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "/x.iso".into(),
            },
        );
        cmd.name = "a,debug-threads=on";
        let args = strings(cmd.argv().unwrap());
        assert_eq!(value_of(&args, "-name", 0), "guest=a,,debug-threads=on");
    }

    #[test]
    fn unsafe_paths_are_refused() {
        let ports = [port(1, 2, Protocol::Tcp)];
        let cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "relative.iso".into(),
            },
        );
        assert_eq!(
            cmd.argv(),
            Err(CmdlineError::RelativePath("relative.iso".into()))
        );
        let cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "/a\nb".into(),
            },
        );
        assert_eq!(cmd.argv(), Err(CmdlineError::UnsafePath("/a\nb".into())));
    }

    #[test]
    fn confinement_and_passthrough() {
        let ports = [port(1, 2, Protocol::Tcp)];
        let extra = vec!["-smbios".to_string(), "type=1,serial=x".to_string()];
        let mut cmd = command(
            &ports,
            BootMedium::Cdrom {
                path: "/x.iso".into(),
            },
        );
        cmd.extra_args = &extra;
        cmd.confinement = Confinement {
            sandbox: true,
            chroot: Some("/state/tasks/web".into()),
            runas: Some("qemu-executor".into()),
        };
        let args = strings(cmd.argv().unwrap());
        assert_eq!(value_of(&args, "-sandbox", 0), SANDBOX_RUNAS);
        assert_eq!(value_of(&args, "-chroot", 0), "/state/tasks/web");
        assert_eq!(value_of(&args, "-runas", 0), "qemu-executor");
        assert_eq!(&args[args.len() - 2..], ["-smbios", "type=1,serial=x"]);

        cmd.confinement.runas = None;
        let args = strings(cmd.argv().unwrap());
        assert_eq!(value_of(&args, "-sandbox", 0), SANDBOX);
        assert!(SANDBOX.contains("elevateprivileges=deny"));
        assert!(!args.iter().any(|a| a == "-runas"));
    }

    #[test]
    fn escape_doubles_commas_only() {
        assert_eq!(escape(OsStr::new("a,b,,c")), "a,,b,,,,c");
        assert_eq!(escape(OsStr::new("plain=path")), "plain=path");
    }

    /// qemu's own splitting rule, to check what an option string means.
    fn split_qemu_opts(s: &str) -> Vec<String> {
        let mut parts = vec![String::new()];
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    parts.last_mut().unwrap().push(',');
                } else {
                    parts.push(String::new());
                }
            } else {
                parts.last_mut().unwrap().push(c);
            }
        }
        parts
    }
}

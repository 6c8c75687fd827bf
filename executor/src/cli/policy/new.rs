//! `qemu-executor policy new NAME [--dir DIR] [--sdk PATH]`: a Rust policy
//! crate, ready to build and test, from templates built into the binary.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use super::{EXIT_ACCEPT, EXIT_BAD_INPUT, report_error};

/// The SDK this binary was built from; used when it is still there.
const BUILT_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-sdk");

/// (path in the new crate, template).
const TEMPLATES: [(&str, &str); 5] = [
    ("Cargo.toml", include_str!("templates/Cargo.toml.tmpl")),
    ("src/lib.rs", include_str!("templates/lib.rs.tmpl")),
    ("CASES.toml", include_str!("templates/CASES.toml.tmpl")),
    ("README.md", include_str!("templates/README.md.tmpl")),
    (".gitignore", include_str!("templates/gitignore.tmpl")),
];

/// Names the template's code uses: a policy type of the same name would
/// clash with them.
const TAKEN_TYPE_NAMES: [&str; 6] = [
    "Decision",
    "Deserialize",
    "HostFacts",
    "Policy",
    "Settings",
    "Task",
];

/// Crate names Cargo or the template cannot use.
const RESERVED: [&str; 8] = [
    "alloc",
    "core",
    "policy_sdk",
    "proc_macro",
    "serde",
    "std",
    "test",
    "self",
];

const KEYWORDS: [&str; 52] = [
    "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
    "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
    "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub", "ref",
    "return", "self", "static", "struct", "super", "trait", "true", "try", "type", "typeof",
    "unsafe", "unsized", "use", "virtual", "where", "while", "yield", "union",
];

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The policy's name: lower-case letters, digits, '-' and '_', starting
    /// with a letter. It names the crate, its directory and the policy.
    pub name: String,
    /// The directory to create the crate in (as DIR/NAME).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// The policy-sdk crate to depend on [default: the one this executor
    /// was built from].
    #[arg(long, value_name = "PATH")]
    pub sdk: Option<PathBuf>,
}

pub fn run(args: NewArgs) -> anyhow::Result<ExitCode> {
    let prepared = check_name(&args.name)
        .map_err(anyhow::Error::msg)
        .and_then(|()| find_sdk(args.sdk.as_deref()));
    let sdk = match prepared {
        Ok(sdk) => sdk,
        Err(err) => return Ok(report_error(&err, EXIT_BAD_INPUT)),
    };
    let root = args.dir.join(&args.name);
    let mut files = render(&args.name, &sdk)?;
    if let Some(lock) = sdk_lock(&sdk) {
        files.push(("Cargo.lock", lock));
    }
    if let Err(err) = create(&root, &files) {
        return Ok(report_error(&err, EXIT_BAD_INPUT));
    }
    let lib = args.name.replace('-', "_");
    println!("Created policy crate {} ({})", args.name, root.display());
    println!("  depends on the SDK at {}", sdk.display());
    println!("Next:");
    println!("  cd {}", root.display());
    println!("  cargo test");
    println!("  cargo build --release --target wasm32-wasip2");
    println!("  qemu-executor policy test target/wasm32-wasip2/release/{lib}.wasm CASES.toml");
    Ok(ExitCode::from(EXIT_ACCEPT))
}

/// A crate name Cargo accepts and that cannot name a path elsewhere: ASCII
/// lower-case letters, digits, `-` and `_`, starting with a letter, not a
/// keyword or a crate the template depends on.
fn check_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("Policy name {name:?} {why}"));
    if name.is_empty() || name.len() > 64 {
        return bad("must be 1 to 64 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return bad("may only hold lower-case letters, digits, '-' and '_'");
    }
    if !name.as_bytes()[0].is_ascii_lowercase() {
        return bad("must start with a letter");
    }
    let lib = name.replace('-', "_");
    if KEYWORDS.contains(&lib.as_str()) {
        return bad("is a Rust keyword");
    }
    if RESERVED.contains(&lib.as_str()) {
        return bad("is taken by a crate the policy uses or by Rust itself");
    }
    Ok(())
}

/// `port-range` → `PortRange`; a name the template's code already uses gets
/// a `Policy` suffix.
fn type_name(name: &str) -> String {
    let camel: String = name
        .split(['-', '_'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            let first = chars.next().map(|c| c.to_ascii_uppercase());
            first.into_iter().chain(chars).collect::<String>()
        })
        .collect();
    if TAKEN_TYPE_NAMES.contains(&camel.as_str()) {
        format!("{camel}Policy")
    } else {
        camel
    }
}

/// The files of the new crate, placeholders filled in.
fn render(name: &str, sdk: &Path) -> anyhow::Result<Vec<(&'static str, String)>> {
    let sdk = sdk
        .to_str()
        .with_context(|| format!("The SDK path {} is not UTF-8", sdk.display()))?;
    // A TOML string, quoted and escaped.
    let sdk = toml::Value::String(sdk.to_string()).to_string();
    let (ty, lib) = (type_name(name), name.replace('-', "_"));
    Ok(TEMPLATES
        .iter()
        .map(|(path, template)| {
            let text = template
                .replace("{{name}}", name)
                .replace("{{type}}", &ty)
                .replace("{{lib}}", &lib)
                .replace("{{sdk}}", &sdk);
            (*path, text)
        })
        .collect())
}

/// The SDK workspace's `Cargo.lock`, if it has one: the new crate starts
/// from it, so that it builds with the dependency versions the SDK was
/// tested with (and without asking the registry); Cargo trims it to what
/// the crate uses.
fn sdk_lock(sdk: &Path) -> Option<String> {
    fs::read_to_string(sdk.parent()?.join("Cargo.lock")).ok()
}

/// The SDK to depend on, as an absolute path: `--sdk`, else the one this
/// binary was built from.
fn find_sdk(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let (path, origin) = match given {
        Some(path) => (path.to_path_buf(), "--sdk"),
        None => (
            PathBuf::from(BUILT_SDK),
            "the SDK this executor was built from",
        ),
    };
    let manifest = path.join("Cargo.toml");
    let text = match fs::read_to_string(&manifest) {
        Ok(text) => text,
        Err(err) if given.is_none() => anyhow::bail!(
            "The policy SDK this executor was built from is not at {} any more ({err}); \
             pass --sdk PATH to the policy-sdk directory of the qemu-executor sources",
            path.display()
        ),
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "--sdk {}: cannot read {}; pass the policy-sdk directory of the qemu-executor sources",
                    path.display(),
                    manifest.display()
                )
            });
        }
    };
    let name = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("package")?.get("name")?.as_str().map(str::to_string));
    if name.as_deref() != Some("policy-sdk") {
        anyhow::bail!(
            "{origin} {} is not the policy-sdk crate (its Cargo.toml names {})",
            path.display(),
            name.map_or_else(|| "no package".to_string(), |n| format!("package {n:?}"))
        );
    }
    fs::canonicalize(&path).with_context(|| format!("Cannot resolve {}", path.display()))
}

/// Writes the crate into `root`, which must not exist yet; on failure
/// removes what it created, so nothing is left half made.
fn create(root: &Path, files: &[(&'static str, String)]) -> anyhow::Result<()> {
    if root.exists() {
        anyhow::bail!(
            "{} already exists; choose another name or --dir",
            root.display()
        );
    }
    if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent)
            .with_context(|| format!("Cannot create {}", parent.display()))?;
    }
    fs::create_dir(root).with_context(|| format!("Cannot create {}", root.display()))?;
    let written = files.iter().try_for_each(|(path, text)| {
        let path = root.join(path);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("Cannot create {}", dir.display()))?;
        }
        fs::write(&path, text).with_context(|| format!("Cannot write {}", path.display()))
    });
    if written.is_err() {
        let _ = fs::remove_dir_all(root);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_crate_names() {
        for good in ["memory-cap", "a", "x86_only", "caps2"] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        let why = |name: &str| check_name(name).unwrap_err();
        assert!(why("").contains("1 to 64"));
        assert!(why(&"a".repeat(65)).contains("1 to 64"));
        assert!(why("../escape").contains("may only hold"));
        assert!(why("a/b").contains("may only hold"));
        assert!(why("Caps").contains("may only hold"));
        assert!(why("2fast").contains("start with a letter"));
        assert!(why("-x").contains("start with a letter"));
        assert!(why("match").contains("keyword"));
        assert!(why("policy-sdk").contains("taken"));
        assert!(why("serde").contains("taken"));
    }

    #[test]
    fn type_names_are_camel_case_and_do_not_clash() {
        assert_eq!(type_name("memory-cap"), "MemoryCap");
        assert_eq!(type_name("x86_only"), "X86Only");
        assert_eq!(type_name("a--b"), "AB");
        assert_eq!(type_name("policy"), "PolicyPolicy");
        assert_eq!(type_name("task"), "TaskPolicy");
    }

    #[test]
    fn templates_are_filled_in() {
        let files = render("memory-cap", Path::new("/src/qe \"x\"/policy-sdk")).unwrap();
        let file = |name: &str| &files.iter().find(|(p, _)| *p == name).unwrap().1;
        for (path, text) in &files {
            assert!(!text.contains("{{"), "{path} keeps a placeholder");
        }
        let manifest: toml::Table = toml::from_str(file("Cargo.toml")).unwrap();
        assert_eq!(manifest["package"]["name"].as_str(), Some("memory-cap"));
        assert_eq!(
            manifest["dependencies"]["policy-sdk"]["path"].as_str(),
            Some("/src/qe \"x\"/policy-sdk")
        );
        assert!(manifest.contains_key("workspace"));
        assert!(file("src/lib.rs").contains("pub struct MemoryCap;"));
        assert!(file("src/lib.rs").contains("const NAME: &'static str = \"memory-cap\";"));
        assert!(file("CASES.toml").contains("release/memory_cap.wasm"));
        toml::from_str::<toml::Table>(file("CASES.toml")).unwrap();
    }

    #[test]
    fn the_built_sdk_is_found_and_others_are_refused() {
        let sdk = find_sdk(None).unwrap();
        assert!(sdk.is_absolute());
        assert!(sdk.join("wit/policy.wit").exists());
        let err = find_sdk(Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(format!("{err:#}").contains("--sdk /nonexistent"), "{err:#}");
        // The executor's own crate is not the SDK.
        let executor = Path::new(env!("CARGO_MANIFEST_DIR"));
        let err = find_sdk(Some(executor)).unwrap_err().to_string();
        assert!(err.contains("is not the policy-sdk crate"), "{err}");
        assert!(err.contains("package \"qemu-executor\""), "{err}");
    }

    #[test]
    fn an_existing_directory_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("memory-cap");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("keep.txt"), "mine").unwrap();
        let files = render("memory-cap", Path::new("/sdk")).unwrap();
        let err = create(&root, &files).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(fs::read_to_string(root.join("keep.txt")).unwrap(), "mine");

        let fresh = dir.path().join("deeper/new-one");
        create(&fresh, &files).unwrap();
        assert!(fresh.join("src/lib.rs").exists());
        assert!(fresh.join(".gitignore").exists());
    }
}

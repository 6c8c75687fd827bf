//! Where the image comes from: the original driver's `image_source` and
//! `checksum`, or today's `image_path` naming the file an `artifact`
//! delivers into the task directory, the artifact's `source` and
//! `options { checksum }` then being the image's.

use super::hcl::{Attr, Block};
use super::mapping::Ctx;

/// The config's image fields, with their lines.
#[derive(Default)]
pub struct ImageFields {
    pub image_path: Option<(String, usize)>,
    pub image_source: Option<(String, usize)>,
    pub checksum: Option<(String, usize)>,
}

/// Our `image_source` and `checksum`.
pub struct Image {
    pub source: String,
    pub checksum: String,
}

/// Extensions the scheduler's artifact fetcher unpacks, leaving another
/// file than the one fetched.
const UNPACKED: &[&str] = &[
    ".zip", ".tar", ".tgz", ".tbz2", ".txz", ".tzst", ".gz", ".bz2", ".xz", ".zst",
];

struct Artifact<'a> {
    block: &'a Block,
    source: Option<(String, usize)>,
    checksum: Option<(String, usize)>,
    destination: String,
    mode: String,
    archive: bool,
}

impl Artifact<'_> {
    /// Its source's line, which tells one artifact from another.
    fn line(&self) -> usize {
        self.source
            .as_ref()
            .map_or(self.block.line, |(_, line)| *line)
    }
}

pub fn resolve(
    ctx: &mut Ctx,
    config: &Block,
    fields: &ImageFields,
    artifacts: &[&Block],
) -> Option<Image> {
    let artifacts: Vec<Artifact<'_>> = artifacts.iter().map(|b| read_artifact(ctx, b)).collect();
    match (&fields.image_path, &fields.image_source) {
        (Some(_), Some((_, line))) => {
            ctx.problem(
                *line,
                "config.image_source",
                "give image_path (today's driver, with an artifact) or image_source (the original driver), not both",
            );
            None
        }
        (None, None) => {
            ctx.problem(
                config.line,
                "config",
                "needs image_path (with an artifact that delivers it) or image_source (with checksum)",
            );
            None
        }
        (None, Some((source, line))) => {
            for a in &artifacts {
                ctx.problem(
                    a.line(),
                    "artifact",
                    "not supported: with image_source the image comes from the config, and nothing else is fetched",
                );
            }
            ctx.origin("image_source", *line, "config.image_source");
            let Some((checksum, sum_line)) = &fields.checksum else {
                ctx.problem(
                    *line,
                    "config.checksum",
                    "is required with image_source: images are always verified here",
                );
                return None;
            };
            ctx.origin("checksum", *sum_line, "config.checksum");
            Some(Image {
                source: source.clone(),
                checksum: checksum.clone(),
            })
        }
        (Some((path, line)), None) => {
            if let Some((_, sum_line)) = &fields.checksum {
                ctx.problem(
                    *sum_line,
                    "config.checksum",
                    "goes with image_source; with image_path the checksum is the artifact's options { checksum }",
                );
            }
            from_artifact(ctx, path, *line, &artifacts)
        }
    }
}

fn from_artifact(
    ctx: &mut Ctx,
    image_path: &str,
    line: usize,
    artifacts: &[Artifact<'_>],
) -> Option<Image> {
    let wanted = normalize(image_path);
    let delivered: Vec<Option<String>> = artifacts.iter().map(delivers).collect();
    let chosen = delivered.iter().position(|d| d.as_deref() == Some(&wanted));
    for (i, a) in artifacts.iter().enumerate() {
        if chosen.is_some_and(|c| c != i) {
            ctx.problem(
                a.line(),
                "artifact",
                "not supported: only the artifact that delivers image_path is fetched here",
            );
        }
    }
    let Some(i) = chosen else {
        if artifacts.iter().any(|a| a.source.is_none()) {
            // Already refused for its missing source, which is the cause.
            return None;
        }
        let known: Vec<&str> = delivered.iter().flatten().map(String::as_str).collect();
        let listing = match (artifacts.is_empty(), known.is_empty()) {
            (true, _) => "the task has no artifact".to_string(),
            (false, true) => "its artifacts deliver no named file".to_string(),
            (false, false) => format!("its artifacts deliver {}", known.join(", ")),
        };
        ctx.problem(
            line,
            "config.image_path",
            format!(
                "{image_path:?} is not a file an artifact delivers ({listing}); here the image must come from an artifact with a checksum, never from a path on the host"
            ),
        );
        return None;
    };
    let a = &artifacts[i];
    let (source, source_line) = a.source.clone()?;
    if a.archive && is_unpacked(&source) {
        ctx.problem(
            source_line,
            "artifact.source",
            "the scheduler would unpack this file; images are fetched whole here (add options { archive = false } if the image itself is compressed that way, which qemu cannot read either)",
        );
        return None;
    }
    ctx.origin("image_source", source_line, "artifact.source");
    let Some((checksum, sum_line)) = a.checksum.clone() else {
        ctx.problem(
            a.block.line,
            "artifact.options.checksum",
            "is required: images are always verified here; add options { checksum = \"md5:…\" }",
        );
        return None;
    };
    ctx.origin("checksum", sum_line, "artifact.options.checksum");
    Some(Image {
        source: strip_checksum_query(&source),
        checksum,
    })
}

fn read_artifact<'a>(ctx: &mut Ctx, block: &'a Block) -> Artifact<'a> {
    let mut a = Artifact {
        block,
        source: None,
        checksum: None,
        destination: "local/".to_string(),
        mode: "any".to_string(),
        archive: true,
    };
    for attr in &block.attrs {
        let field = format!("artifact.{}", attr.key);
        match attr.key.as_str() {
            "source" => {
                a.source = ctx.read(attr, &field, Attr::string).map(|s| (s, attr.line));
                if let Some((s, _)) = &a.source
                    && let Some(sum) = checksum_query(s)
                {
                    a.checksum = Some((sum, attr.line));
                }
            }
            "destination" => {
                if let Some(d) = ctx.read(attr, &field, Attr::string) {
                    a.destination = d;
                }
            }
            "mode" => match ctx.read(attr, &field, Attr::string).as_deref() {
                Some(m @ ("any" | "file")) => a.mode = m.to_string(),
                Some("dir") => ctx.problem(
                    attr.line,
                    field,
                    "not supported: the image is one file, fetched whole",
                ),
                Some(other) => ctx.problem(
                    attr.line,
                    field,
                    format!("{other:?} is not an artifact mode (any, file, dir)"),
                ),
                None => {}
            },
            "options" => {
                let value = ctx.read(attr, &field, Attr::value);
                if value.is_some() {
                    read_options(ctx, attr.line, value, &mut a);
                }
            }
            "headers" => ctx.problem(
                attr.line,
                field,
                "not supported: images are fetched without extra headers",
            ),
            "chown" => ctx.warn(
                attr.line,
                field,
                "ignored: the image lives in the executor's cache",
            ),
            other => ctx.problem(
                attr.line,
                field,
                format!(
                    "{other:?} is not a field of artifact (source, destination, mode, options)"
                ),
            ),
        }
    }
    for inner in &block.blocks {
        match inner.ident.as_str() {
            "options" => {
                for attr in &inner.attrs {
                    let value =
                        ctx.read(attr, &format!("artifact.options.{}", attr.key), Attr::value);
                    let mut one = hcl::Map::new();
                    if let Some(v) = value {
                        one.insert(attr.key.clone(), v);
                        read_options(ctx, attr.line, Some(hcl::Value::Object(one)), &mut a);
                    }
                }
            }
            "headers" => ctx.problem(
                inner.line,
                "artifact.headers",
                "not supported: images are fetched without extra headers",
            ),
            other => ctx.problem(
                inner.line,
                format!("artifact.{other}"),
                "not a block of artifact (options)",
            ),
        }
    }
    if a.source.is_none() {
        ctx.problem(block.line, "artifact.source", "is required");
    }
    a
}

fn read_options(ctx: &mut Ctx, line: usize, value: Option<hcl::Value>, a: &mut Artifact<'_>) {
    let Some(hcl::Value::Object(map)) = value else {
        ctx.problem(line, "artifact.options", "expected a map of options");
        return;
    };
    for (key, value) in map {
        let field = format!("artifact.options.{key}");
        match key.as_str() {
            "checksum" => match super::hcl::as_string(&value) {
                Ok(sum) => match &a.checksum {
                    Some((other, _)) if *other != sum => ctx.problem(
                        line,
                        field,
                        format!("differs from the checksum in the source URL ({other})"),
                    ),
                    _ => a.checksum = Some((sum, line)),
                },
                Err(e) => ctx.problem(line, field, e),
            },
            "archive" => match super::hcl::as_bool(&value) {
                Ok(b) => a.archive = b,
                Err(e) => ctx.problem(line, field, e),
            },
            other => ctx.problem(
                line,
                field,
                format!("not supported: the fetcher here takes checksum and archive, not {other}"),
            ),
        }
    }
}

/// The path, relative to the task directory, of the file an artifact
/// leaves: its destination in `file` mode, else the source's file name in
/// the destination directory.
fn delivers(a: &Artifact<'_>) -> Option<String> {
    if a.mode == "file" {
        return Some(normalize(&a.destination));
    }
    let (source, _) = a.source.as_ref()?;
    let name = file_name(source)?;
    let name = if a.archive {
        // What the fetcher leaves of a compressed file: its name without
        // the extension. Refused later anyway; named right in errors.
        UNPACKED
            .iter()
            .find_map(|ext| name.strip_suffix(ext))
            .unwrap_or(&name)
            .to_string()
    } else {
        name
    };
    Some(normalize(&format!("{}/{name}", a.destination)))
}

/// The name the fetched file gets: the last segment of the source's path
/// (read as text, so that sources refused later are still named right).
fn file_name(source: &str) -> Option<String> {
    let path = source.split(['?', '#']).next().unwrap_or(source);
    path.rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

fn is_unpacked(source: &str) -> bool {
    file_name(source).is_some_and(|n| UNPACKED.iter().any(|ext| n.ends_with(ext)))
}

/// `./local//x.img/` → `local/x.img`.
fn normalize(path: &str) -> String {
    let joined = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect::<Vec<_>>()
        .join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// The `?checksum=` a source URL may carry, as the scheduler's fetcher
/// reads it.
fn checksum_query(source: &str) -> Option<String> {
    let url = url::Url::parse(source).ok()?;
    url.query_pairs()
        .find(|(k, _)| k == "checksum")
        .map(|(_, v)| v.into_owned())
}

fn strip_checksum_query(source: &str) -> String {
    let Ok(mut url) = url::Url::parse(source) else {
        return source.to_string();
    };
    if url.query().is_none() {
        return source.to_string();
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| k != "checksum")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    url.to_string()
}

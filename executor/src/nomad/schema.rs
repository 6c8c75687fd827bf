//! The HCL schemas Nomad checks our configuration blocks against: the
//! plugin block of the client's config, and each task's `config` block.
//! Nomad turns them into hcldec specs, so a job with a misspelled or
//! mistyped field is refused when it is submitted, before it is placed.

use std::collections::HashMap;

use nomad_proto::hclspec::{self, Spec, spec::Block};

/// The task `config` block: our task file's fields, under both the names
/// of the seed driver (`image_source`, `host_port`, ...) and of today's
/// (`image_path`, `port_map`, ...). Memory, cores and ports come from the
/// task's resources and the group's network, as Nomad allocated them.
pub const TASK_ATTRS: &[(&str, &str)] = &[
    ("image_source", "string"),
    ("image_path", "string"),
    ("checksum", "string"),
    ("accelerator", "string"),
    ("kvm_fallback", "bool"),
    ("host_port", "number"),
    ("guest_port", "number"),
    ("port_map", "list(map(number))"),
    ("graceful_shutdown", "bool"),
    ("args", "list(string)"),
    ("machine_type", "string"),
    ("drive_interface", "string"),
    ("ready_serial", "string"),
    ("ready_timeout_s", "number"),
    ("ready_check", "string"),
    ("emulator", "string"),
];

/// The plugin block's `config`.
pub const PLUGIN_ATTRS: &[(&str, &str)] = &[
    ("config", "string"),
    ("state_dir", "string"),
    ("cache_dir", "string"),
    ("fingerprint_period_s", "number"),
];

/// One `policy { ... }` block of the plugin config.
pub const POLICY_ATTRS: &[(&str, &str, bool)] = &[
    ("module", "string", true),
    ("sha256", "string", false),
    ("settings", "string", false),
    ("time_ms", "number", false),
    ("memory_mb", "number", false),
];

pub fn task_schema() -> Spec {
    object(
        TASK_ATTRS
            .iter()
            .map(|(name, ty)| (*name, attr(name, ty, false))),
    )
}

pub fn plugin_schema() -> Spec {
    let policy = object(
        POLICY_ATTRS
            .iter()
            .map(|(name, ty, required)| (*name, attr(name, ty, *required))),
    );
    let block_list = Spec {
        block: Some(Block::BlockList(Box::new(hclspec::BlockList {
            name: "policy".into(),
            min_items: 0,
            max_items: 0,
            nested: Some(Box::new(policy)),
        }))),
    };
    object(
        PLUGIN_ATTRS
            .iter()
            .map(|(name, ty)| (*name, attr(name, ty, false)))
            .chain([("policy", block_list)]),
    )
}

fn attr(name: &str, ty: &str, required: bool) -> Spec {
    Spec {
        block: Some(Block::Attr(hclspec::Attr {
            name: name.into(),
            r#type: ty.into(),
            required,
        })),
    }
}

fn object<'a>(attributes: impl IntoIterator<Item = (&'a str, Spec)>) -> Spec {
    let attributes: HashMap<String, Spec> = attributes
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Spec {
        block: Some(Block::Object(hclspec::Object { attributes })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(spec: &Spec) -> Vec<String> {
        let Some(Block::Object(o)) = &spec.block else {
            panic!("not an object: {spec:?}")
        };
        let mut names: Vec<String> = o.attributes.keys().cloned().collect();
        names.sort();
        names
    }

    #[test]
    fn task_schema_names_every_field_the_decoder_reads() {
        let mut want: Vec<&str> = TASK_ATTRS.iter().map(|(n, _)| *n).collect();
        want.sort();
        assert_eq!(names(&task_schema()), want);
        // Attribute names must be set: hcldec refuses empty ones.
        let Some(Block::Object(o)) = task_schema().block else {
            unreachable!()
        };
        for (key, spec) in &o.attributes {
            let Some(Block::Attr(a)) = &spec.block else {
                panic!("{key} is not an attribute")
            };
            assert_eq!(&a.name, key);
            assert!(!a.r#type.is_empty());
        }
    }

    #[test]
    fn plugin_schema_has_policy_blocks() {
        let spec = plugin_schema();
        assert!(names(&spec).contains(&"policy".to_string()));
        let Some(Block::Object(o)) = spec.block else {
            unreachable!()
        };
        let Some(Block::BlockList(list)) = &o.attributes["policy"].block else {
            panic!("policy is not a block list")
        };
        assert_eq!(list.name, "policy");
        let nested = list.nested.as_deref().expect("nested spec");
        assert_eq!(
            names(nested),
            ["memory_mb", "module", "settings", "sha256", "time_ms"]
        );
    }
}

//! The plugin's `hclspec` schemas read as Nomad's client reads them
//! (`hclspecutils.Convert`): every attribute with its type, and the rules
//! that make a schema fail only once a real agent loads it: names must be
//! non-empty (a `Default`'s primary gets no implied name), types must be
//! HCL type expressions, defaults must be literals.

use std::collections::BTreeMap;

use nomad_proto::hclspec::{Spec, spec::Block};

/// One attribute of an object schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    Attr {
        /// The HCL type expression, as sent.
        type_expr: String,
        required: bool,
        /// The literal expression of a `Default` wrapper.
        default: Option<String>,
    },
    /// `BlockList` / `BlockSet`: repeated nested blocks.
    Blocks {
        min_items: u64,
        max_items: u64,
        nested: BTreeMap<String, Attribute>,
    },
}

impl Attribute {
    /// The type expression of a plain attribute; panics on blocks.
    pub fn type_expr(&self) -> &str {
        match self {
            Attribute::Attr { type_expr, .. } => type_expr,
            Attribute::Blocks { .. } => panic!("a block has no type expression: {self:?}"),
        }
    }
}

/// The attributes of a root `Object` spec, checked.
pub fn object_attributes(spec: &Spec) -> Result<BTreeMap<String, Attribute>, String> {
    match &spec.block {
        Some(Block::Object(object)) => object
            .attributes
            .iter()
            .map(|(name, spec)| Ok((name.clone(), attribute(name, spec)?)))
            .collect(),
        other => Err(format!(
            "the root of the schema is not an Object: {other:?}"
        )),
    }
}

fn attribute(key: &str, spec: &Spec) -> Result<Attribute, String> {
    if key.is_empty() {
        return Err("an Object attribute has an empty name".into());
    }
    match &spec.block {
        Some(Block::Attr(attr)) => {
            // Inside an Object the key is the implied name; a name that
            // differs would make hcldec read another attribute.
            if !attr.name.is_empty() && attr.name != key {
                return Err(format!("{key}: its Attr is named {:?}", attr.name));
            }
            check_type(&attr.r#type).map_err(|e| format!("{key}: {e}"))?;
            Ok(Attribute::Attr {
                type_expr: attr.r#type.clone(),
                required: attr.required,
                default: None,
            })
        }
        Some(Block::Default(default)) => {
            let Some(Block::Attr(attr)) = default.primary.as_ref().and_then(|p| p.block.as_ref())
            else {
                return Err(format!("{key}: a Default whose primary is not an Attr"));
            };
            if attr.name != key {
                return Err(format!(
                    "{key}: a Default's primary gets no implied name, so its Attr must be named {key:?}, not {:?}",
                    attr.name
                ));
            }
            check_type(&attr.r#type).map_err(|e| format!("{key}: {e}"))?;
            let Some(Block::Literal(literal)) =
                default.default.as_ref().and_then(|d| d.block.as_ref())
            else {
                return Err(format!("{key}: a Default whose default is not a Literal"));
            };
            Ok(Attribute::Attr {
                type_expr: attr.r#type.clone(),
                required: attr.required,
                default: Some(literal.value.clone()),
            })
        }
        Some(Block::BlockList(list)) => blocks(
            key,
            &list.name,
            list.min_items,
            list.max_items,
            &list.nested,
        ),
        Some(Block::BlockSet(set)) => {
            blocks(key, &set.name, set.min_items, set.max_items, &set.nested)
        }
        other => Err(format!(
            "{key}: a spec this harness does not read: {other:?}"
        )),
    }
}

fn blocks(
    key: &str,
    name: &str,
    min_items: u64,
    max_items: u64,
    nested: &Option<Box<Spec>>,
) -> Result<Attribute, String> {
    if name != key {
        return Err(format!("{key}: its block is named {name:?}"));
    }
    let nested = nested
        .as_deref()
        .ok_or_else(|| format!("{key}: a block without a nested spec"))?;
    Ok(Attribute::Blocks {
        min_items,
        max_items,
        nested: object_attributes(nested).map_err(|e| format!("{key}: {e}"))?,
    })
}

/// Checks an HCL type expression of the kinds driver schemas use.
pub fn check_type(expr: &str) -> Result<(), String> {
    fn parse(s: &str) -> Option<&str> {
        for primitive in ["string", "bool", "number", "any"] {
            if let Some(rest) = s.strip_prefix(primitive) {
                return Some(rest);
            }
        }
        for collection in ["list(", "set(", "map("] {
            if let Some(rest) = s.strip_prefix(collection) {
                return parse(rest)?.strip_prefix(')');
            }
        }
        None
    }
    match parse(expr) {
        Some("") => Ok(()),
        _ => Err(format!("{expr:?} is not an HCL type expression")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomad_proto::hclspec::{Attr, BlockList, Default, Literal, Object};

    fn spec(block: Block) -> Spec {
        Spec { block: Some(block) }
    }

    fn attr(name: &str, ty: &str, required: bool) -> Spec {
        spec(Block::Attr(Attr {
            name: name.into(),
            r#type: ty.into(),
            required,
        }))
    }

    fn object(attrs: Vec<(&str, Spec)>) -> Spec {
        spec(Block::Object(Object {
            attributes: attrs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }))
    }

    #[test]
    fn type_expressions() {
        for ok in [
            "string",
            "number",
            "bool",
            "any",
            "list(string)",
            "list(map(number))",
        ] {
            check_type(ok).unwrap();
        }
        for bad in ["", "str", "list(string", "list()", "map(number))", "String"] {
            assert!(check_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_attrs_defaults_and_block_lists() {
        let s = object(vec![
            ("image_path", attr("", "string", true)),
            (
                "period",
                spec(Block::Default(Box::new(Default {
                    primary: Some(Box::new(attr("period", "number", false))),
                    default: Some(Box::new(spec(Block::Literal(Literal {
                        value: "30".into(),
                    })))),
                }))),
            ),
            (
                "policy",
                spec(Block::BlockList(Box::new(BlockList {
                    name: "policy".into(),
                    min_items: 0,
                    max_items: 0,
                    nested: Some(Box::new(object(vec![(
                        "module",
                        attr("module", "string", true),
                    )]))),
                }))),
            ),
        ]);
        let attrs = object_attributes(&s).unwrap();
        assert_eq!(attrs["image_path"].type_expr(), "string");
        assert_eq!(
            attrs["period"],
            Attribute::Attr {
                type_expr: "number".into(),
                required: false,
                default: Some("30".into())
            }
        );
        let Attribute::Blocks { nested, .. } = &attrs["policy"] else {
            panic!("{attrs:?}")
        };
        assert_eq!(nested["module"].type_expr(), "string");
    }

    #[test]
    fn a_default_whose_attr_has_no_name_is_refused() {
        let s = object(vec![(
            "period",
            spec(Block::Default(Box::new(Default {
                primary: Some(Box::new(attr("", "number", false))),
                default: Some(Box::new(spec(Block::Literal(Literal {
                    value: "30".into(),
                })))),
            }))),
        )]);
        let err = object_attributes(&s).unwrap_err();
        assert!(err.contains("no implied name"), "{err}");
    }

    #[test]
    fn a_bad_type_or_root_is_refused() {
        let err = object_attributes(&object(vec![("x", attr("x", "strin", false))])).unwrap_err();
        assert!(err.contains("x: \"strin\""), "{err}");
        assert!(object_attributes(&attr("x", "string", false)).is_err());
    }
}

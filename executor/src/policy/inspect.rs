//! What a policy module is, for `qemu-executor policy inspect`: its size and
//! sha256, the contract version it exports, what it imports and whether the
//! executor grants each import, all read from the component's type; and its
//! metadata, which only the policy can tell, from one call made in a fresh
//! instance under the usual limits.

use std::path::{Path, PathBuf};

use policy_sdk::Metadata;
use serde::Serialize;
use wasmtime::Engine;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker, LinkerInstance, ResourceType};

use super::artifacts::sha256_hex;
use super::host::{self, EVALUATOR, Exports};
use super::wasi::GuestState;
use super::{CONTRACT_VERSION, Limits, PolicyEngine, PolicyError};

/// What `policy inspect` reports about one module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inspection {
    pub module: PathBuf,
    /// Bytes on disk.
    pub size: u64,
    pub sha256: String,
    /// The contract version of the `evaluator` the module exports (empty
    /// when unversioned); `None` when it exports no evaluator at all.
    pub contract: Option<String>,
    /// The contract version this executor speaks.
    pub supported_contract: &'static str,
    /// What the policy says it is; `None` when it could not be asked.
    pub metadata: Option<Metadata>,
    /// Why the metadata is missing or unusable.
    pub metadata_problem: Option<String>,
    /// Whether reading the metadata failed because the policy misbehaved
    /// (trap, limit) rather than because the module cannot be linked.
    pub metadata_fault: bool,
    /// Every import, in the order the component declares them.
    pub imports: Vec<Import>,
}

/// One import of a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Import {
    /// As the component names it, such as `wasi:io/streams@0.2.6`.
    pub name: String,
    /// `instance`, `function`, `resource`, `type`, `module` or `component`.
    pub kind: &'static str,
    /// Why the executor would not link it; `None` when it grants it.
    pub refused: Option<String>,
}

impl Inspection {
    /// Whether the exported evaluator speaks a contract this executor
    /// supports.
    pub fn contract_supported(&self) -> bool {
        self.contract
            .as_deref()
            .is_some_and(|found| host::compatible(found, CONTRACT_VERSION))
    }

    /// The imports the executor does not grant.
    pub fn refused_imports(&self) -> impl Iterator<Item = &Import> {
        self.imports.iter().filter(|i| i.refused.is_some())
    }

    /// Why loading the module would fail, one sentence each (settings
    /// aside: they are checked when it is loaded with them); empty when it
    /// would load.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        match &self.contract {
            None => problems.push(format!(
                "It does not export {EVALUATOR}: it is not a policy component"
            )),
            Some(found) if !self.contract_supported() => problems.push(format!(
                "It speaks policy contract {}, this executor speaks {CONTRACT_VERSION}",
                if found.is_empty() {
                    "(unversioned)"
                } else {
                    found
                }
            )),
            Some(_) => {}
        }
        for import in self.refused_imports() {
            problems.push(format!(
                "It imports {} `{}`, which this executor does not grant",
                import.kind, import.name
            ));
        }
        // Without a supported contract the metadata cannot be asked for;
        // that is said above already.
        if let Some(problem) = &self.metadata_problem
            && self.contract_supported()
        {
            problems.push(format!("Its metadata: {problem}"));
        }
        problems
    }
}

impl PolicyEngine {
    /// Inspects a module without loading it into a chain. Fails only when
    /// the module cannot be read or is not a component at all; everything
    /// else that would stop it from loading is reported in the
    /// [`Inspection`]. Compiles it (or reads it back from the cache), so
    /// it is blocking and may take seconds.
    pub fn inspect(&self, path: &Path, limits: Limits) -> Result<Inspection, PolicyError> {
        limits
            .validate()
            .map_err(|problem| PolicyError::BadLimits {
                path: path.to_path_buf(),
                problem,
            })?;
        let bytes = host::read_module(path)?;
        let sha256 = sha256_hex(&bytes);
        let (component, _) = self.compile(path, &bytes, &sha256)?;
        let engine = self.wasmtime();
        let contract = host::evaluator_version(engine, &component);
        let items: Vec<(String, ComponentItem)> = component
            .component_type()
            .imports(engine)
            .map(|(name, import)| (name.to_string(), import.ty))
            .collect();
        let refused = refused_imports(self.linker(), engine, &component, &items);
        let imports = items
            .iter()
            .zip(refused)
            .map(|((name, item), refused)| Import {
                name: name.clone(),
                kind: kind(item),
                refused,
            })
            .collect();
        let mut inspection = Inspection {
            module: path.to_path_buf(),
            size: bytes.len() as u64,
            sha256,
            contract,
            supported_contract: CONTRACT_VERSION,
            metadata: None,
            metadata_problem: None,
            metadata_fault: false,
            imports,
        };
        self.read_metadata(&component, &items, limits, &mut inspection);
        Ok(inspection)
    }

    /// Asks the policy for its metadata, in a fresh instance under `limits`.
    /// Imports the executor does not grant are stood in for by functions
    /// that trap, so that a module which would not load can still say what
    /// it is (unless it calls one of them).
    fn read_metadata(
        &self,
        component: &Component,
        items: &[(String, ComponentItem)],
        limits: Limits,
        inspection: &mut Inspection,
    ) {
        if !inspection.contract_supported() {
            inspection.metadata_problem = Some(format!(
                "not read: the module does not speak contract {CONTRACT_VERSION}"
            ));
            return;
        }
        let refused: Vec<bool> = inspection
            .imports
            .iter()
            .map(|i| i.refused.is_some())
            .collect();
        let linker = match with_stubs(self.linker(), self.wasmtime(), items, |j| refused[j]) {
            Ok(linker) => linker,
            Err(err) => {
                inspection.metadata_problem = Some(format!("not read: {err}"));
                return;
            }
        };
        let pre = match linker.instantiate_pre(component) {
            Ok(pre) => pre,
            Err(err) => {
                inspection.metadata_problem = Some(format!("not read: {}", chain_text(&err)));
                return;
            }
        };
        let Some(exports) = Exports::find(self.wasmtime(), component) else {
            inspection.metadata_problem =
                Some("not read: the evaluator lacks a function of the contract".into());
            return;
        };
        match host::read_metadata(self, &pre, exports, limits) {
            Ok(Ok(metadata)) => {
                if let Err(problem) = host::check_metadata(&metadata) {
                    inspection.metadata_problem = Some(format!("unusable: {problem}"));
                }
                inspection.metadata = Some(metadata);
            }
            Ok(Err((function, err))) => {
                inspection.metadata_problem = Some(format!(
                    "not read: its function {function} does not have the contract's type: {}",
                    chain_text(&err)
                ));
            }
            Err(fault) => {
                inspection.metadata_problem = Some(format!("the policy failed: {fault}"));
                inspection.metadata_fault = true;
            }
        }
    }
}

/// For each import, why the executor would not link it (`None`: granted).
///
/// The linker only says which import failed first, so each import is
/// checked in turn, in declaration order, with those found refused before
/// it and every one after it stood in for by trapping stubs: an import can
/// only depend on types of imports declared before it, so what remains is
/// whether the executor links this one.
fn refused_imports(
    linker: &Linker<GuestState>,
    engine: &Engine,
    component: &Component,
    items: &[(String, ComponentItem)],
) -> Vec<Option<String>> {
    let mut refused: Vec<Option<String>> = vec![None; items.len()];
    if linker.instantiate_pre(component).is_ok() {
        return refused;
    }
    for k in 0..items.len() {
        let trial = with_stubs(linker, engine, items, |j| j > k || refused[j].is_some());
        refused[k] = match trial {
            Err(err) => Some(format!("cannot be checked: {err}")),
            Ok(trial) => match trial.instantiate_pre(component) {
                Ok(_) => None,
                Err(err) => Some(refusal(&err)),
            },
        };
    }
    refused
}

/// Why the linker refused an import: the causes under its generic
/// "component imports ... but a matching implementation was not found".
fn refusal(err: &wasmtime::Error) -> String {
    let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
    if causes.is_empty() {
        "not provided".to_string()
    } else {
        causes.join(": ")
    }
}

fn chain_text(err: &wasmtime::Error) -> String {
    err.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// A stand-in resource type for imports the executor does not grant.
struct Refused;

/// A copy of `linker` in which the imports `stubbed(j)` selects are
/// defined by trapping stand-ins, replacing whatever the linker had under
/// the same name.
fn with_stubs(
    linker: &Linker<GuestState>,
    engine: &Engine,
    items: &[(String, ComponentItem)],
    stubbed: impl Fn(usize) -> bool,
) -> wasmtime::Result<Linker<GuestState>> {
    let mut linker = linker.clone();
    linker.allow_shadowing(true);
    // Resources already introduced by earlier imports: a later mention is
    // the same type (`use wasi:io/streams.{input-stream}`), which needs no
    // definition and must not get a different one.
    let mut seen = Vec::new();
    for (j, (name, item)) in items.iter().enumerate() {
        let mut root = linker.root();
        let target = if stubbed(j) { Some(&mut root) } else { None };
        stub(target, name, item, engine, &mut seen)?;
    }
    Ok(linker)
}

/// Walks one import's type, recording the resources it introduces, and
/// defines it in `linker` (when given) with functions that trap and
/// resources that hold nothing.
fn stub(
    mut linker: Option<&mut LinkerInstance<'_, GuestState>>,
    name: &str,
    item: &ComponentItem,
    engine: &Engine,
    seen: &mut Vec<ResourceType>,
) -> wasmtime::Result<()> {
    match item {
        ComponentItem::ComponentFunc(_) => {
            if let Some(linker) = linker {
                let what = name.to_string();
                linker.func_new(name, move |_, _, _, _| {
                    wasmtime::bail!("`{what}` is not granted by this executor")
                })?;
            }
            Ok(())
        }
        ComponentItem::Resource(ty) => {
            if seen.contains(ty) {
                return Ok(());
            }
            seen.push(*ty);
            if let Some(linker) = linker {
                linker.resource(name, ResourceType::host::<Refused>(), |_, _| Ok(()))?;
            }
            Ok(())
        }
        ComponentItem::ComponentInstance(instance) => {
            let mut inner = match linker.as_mut() {
                Some(linker) => Some(linker.instance(name)?),
                None => None,
            };
            for (export, ty) in instance.exports(engine) {
                stub(inner.as_mut(), export, &ty.ty, engine, seen)?;
            }
            Ok(())
        }
        ComponentItem::Type(_) => Ok(()),
        // Only walked for its resources: a module or component import
        // introduces none a later import could use.
        _ if linker.is_none() => Ok(()),
        other => wasmtime::bail!("cannot stand in for the {} `{name}`", kind(other)),
    }
}

fn kind(item: &ComponentItem) -> &'static str {
    match item {
        ComponentItem::ComponentFunc(_) | ComponentItem::CoreFunc(_) => "function",
        ComponentItem::Module(_) => "module",
        ComponentItem::Component(_) => "component",
        ComponentItem::ComponentInstance(_) => "instance",
        ComponentItem::Type(_) => "type",
        ComponentItem::Resource(_) => "resource",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inspection(contract: Option<&str>, refused: &[&str]) -> Inspection {
        Inspection {
            module: "p.wasm".into(),
            size: 1,
            sha256: "ab".repeat(32),
            contract: contract.map(str::to_string),
            supported_contract: CONTRACT_VERSION,
            metadata: None,
            metadata_problem: None,
            metadata_fault: false,
            imports: refused
                .iter()
                .map(|name| Import {
                    name: name.to_string(),
                    kind: "instance",
                    refused: Some("not provided".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn problems_name_versions_and_imports() {
        assert!(
            inspection(Some(CONTRACT_VERSION), &[])
                .problems()
                .is_empty()
        );
        assert_eq!(
            inspection(Some("0.2.0"), &[]).problems(),
            [format!(
                "It speaks policy contract 0.2.0, this executor speaks {CONTRACT_VERSION}"
            )]
        );
        assert_eq!(
            inspection(None, &["wasi:http/types@0.2.3"]).problems(),
            [
                format!("It does not export {EVALUATOR}: it is not a policy component"),
                "It imports instance `wasi:http/types@0.2.3`, which this executor does not grant"
                    .to_string()
            ]
        );
        assert!(inspection(Some(""), &[]).problems()[0].contains("(unversioned)"));
    }
}

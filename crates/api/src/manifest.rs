//! Reading manifests: YAML (one or more `---`-separated documents) or JSON (an object
//! or an array of objects). Every error names the document, the field path and the fix.

use serde::de::DeserializeOwned;

use crate::application::{Application, ApplicationSpec};
use crate::cluster::{Cluster, ClusterSpec};
use crate::instance::{Instance, InstanceSpec};
use crate::meta::Kind;
use crate::node::{Node, NodeSpec};
use crate::region::{Region, RegionSpec};
use crate::template::{ClusterTemplate, ClusterTemplateSpec};
use crate::validate::{FieldError, FieldErrors};

/// One object read from a manifest.
#[derive(Debug, Clone, PartialEq)]
pub enum Manifest {
    /// A Node.
    Node(Box<Node>),
    /// An Instance.
    Instance(Box<Instance>),
    /// A Region.
    Region(Box<Region>),
    /// A Cluster.
    Cluster(Box<Cluster>),
    /// An Application.
    Application(Box<Application>),
    /// A ClusterTemplate.
    ClusterTemplate(Box<ClusterTemplate>),
}

impl Manifest {
    /// The object's kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::Node(_) => NodeSpec::KIND,
            Manifest::Instance(_) => InstanceSpec::KIND,
            Manifest::Region(_) => RegionSpec::KIND,
            Manifest::Cluster(_) => ClusterSpec::KIND,
            Manifest::Application(_) => ApplicationSpec::KIND,
            Manifest::ClusterTemplate(_) => ClusterTemplateSpec::KIND,
        }
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        match self {
            Manifest::Node(o) => o.name(),
            Manifest::Instance(o) => o.name(),
            Manifest::Region(o) => o.name(),
            Manifest::Cluster(o) => o.name(),
            Manifest::Application(o) => o.name(),
            Manifest::ClusterTemplate(o) => o.name(),
        }
    }

    /// Run the kind's validation.
    pub fn validate(&self) -> Result<(), FieldErrors> {
        match self {
            Manifest::Node(o) => o.validate(),
            Manifest::Instance(o) => o.validate(),
            Manifest::Region(o) => o.validate(),
            Manifest::Cluster(o) => o.validate(),
            Manifest::Application(o) => o.validate(),
            Manifest::ClusterTemplate(o) => o.validate(),
        }
    }
}

/// Kinds this version understands, for error messages.
pub const KINDS: &[&str] = &[
    "Node",
    "Instance",
    "Region",
    "Cluster",
    "Application",
    "ClusterTemplate",
];

/// A manifest that could not be read.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
#[error("document {document}: {errors}")]
pub struct ManifestError {
    /// 1-based index of the document in the file.
    pub document: usize,
    /// What was wrong.
    pub errors: FieldErrors,
}

fn one(document: usize, field: &str, value: &str, message: impl Into<String>) -> ManifestError {
    ManifestError {
        document,
        errors: FieldErrors(vec![FieldError {
            field: field.to_string(),
            value: value.to_string(),
            message: message.into(),
        }]),
    }
}

/// Deserialize what a user wrote (a manifest, a REST body) as `T`, strictly: a field
/// the type does not have is an error naming its path, as is the first field that
/// fails to parse.
///
/// Strictness lives here, at the user's door, and not in the types: the same types
/// travel on the channel and sit in the store, where a field added by a newer hub must
/// be ignored by an older edge rather than break it (`serde_json` decoding of the
/// types is lenient).
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldErrors> {
    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let parsed: Result<T, _> = serde_ignored::deserialize(
        serde_path_to_error::Deserializer::new(value, &mut track),
        |path| unknown.push(path.to_string()),
    );
    let parsed = parsed.map_err(|e| {
        let field = track.path().to_string();
        let field = if field == "." { String::new() } else { field };
        FieldErrors(vec![FieldError {
            field,
            value: String::new(),
            message: e.to_string(),
        }])
    })?;
    if unknown.is_empty() {
        return Ok(parsed);
    }
    Err(FieldErrors(
        unknown
            .into_iter()
            .map(|field| FieldError {
                field,
                value: String::new(),
                message: "unknown field: check its spelling and where it sits (docs/API.md lists every field)".into(),
            })
            .collect(),
    ))
}

fn split_yaml_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line.trim_end() == "---" || line.starts_with("--- ") {
            docs.push(String::new());
            continue;
        }
        if let Some(cur) = docs.last_mut() {
            cur.push_str(line);
            cur.push('\n');
        }
    }
    docs.into_iter()
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Parse raw documents (YAML or JSON) into JSON values, without looking at kinds.
pub fn parse_documents(text: &str) -> Result<Vec<serde_json::Value>, ManifestError> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            one(
                1,
                "",
                "",
                format!(
                    "not valid JSON at line {} column {}: {e}",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        return Ok(match v {
            serde_json::Value::Array(items) => items,
            other => vec![other],
        });
    }
    split_yaml_documents(text)
        .iter()
        .enumerate()
        .map(|(i, doc)| {
            serde_saphyr::from_str::<serde_json::Value>(doc)
                .map_err(|e| one(i + 1, "", "", format!("not valid YAML: {e}")))
        })
        .collect()
}

/// Parse and validate every object in a manifest file.
pub fn parse_manifests(text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let docs = parse_documents(text)?;
    if docs.is_empty() {
        return Err(one(
            1,
            "",
            "",
            "the manifest is empty; expected at least one object with kind, metadata and spec",
        ));
    }
    docs.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let m = manifest_from_value(v).map_err(|errors| ManifestError {
                document: i + 1,
                errors,
            })?;
            m.validate().map_err(|errors| ManifestError {
                document: i + 1,
                errors,
            })?;
            Ok(m)
        })
        .collect()
}

/// Turn one JSON value into a typed manifest (not yet validated).
pub fn manifest_from_value(v: serde_json::Value) -> Result<Manifest, FieldErrors> {
    let kind = match v.get("kind") {
        Some(serde_json::Value::String(k)) => k.clone(),
        Some(other) => {
            let mut e = FieldErrors::default();
            e.push(
                "kind",
                other,
                format!("must be a string, one of {}", KINDS.join(", ")),
            );
            return Err(e);
        }
        None => {
            let mut e = FieldErrors::default();
            e.push(
                "kind",
                "",
                format!("missing; set kind to one of {}", KINDS.join(", ")),
            );
            return Err(e);
        }
    };
    match kind.as_str() {
        "Node" => from_value(v).map(Manifest::Node),
        "Instance" => from_value(v).map(Manifest::Instance),
        "Region" => from_value(v).map(Manifest::Region),
        "Cluster" => from_value(v).map(Manifest::Cluster),
        "Application" => from_value(v).map(Manifest::Application),
        "ClusterTemplate" => from_value(v).map(Manifest::ClusterTemplate),
        other => {
            let mut e = FieldErrors::default();
            e.push(
                "kind",
                other,
                format!("unknown kind; this hub serves {}", KINDS.join(", ")),
            );
            Err(e)
        }
    }
}

/// Resolve a kind name as users type it on the command line (`instances`, `inst`, `Node`).
pub fn resolve_kind(word: &str) -> Option<&'static str> {
    match word.to_ascii_lowercase().as_str() {
        "node" | "nodes" | "no" => Some(NodeSpec::PLURAL),
        "instance" | "instances" | "inst" | "in" => Some(InstanceSpec::PLURAL),
        "region" | "regions" | "reg" => Some(RegionSpec::PLURAL),
        "cluster" | "clusters" | "cl" => Some(ClusterSpec::PLURAL),
        "application" | "applications" | "app" | "apps" => Some(ApplicationSpec::PLURAL),
        "clustertemplate" | "clustertemplates" | "template" | "templates" | "ct" => {
            Some(ClusterTemplateSpec::PLURAL)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
kind: Instance
metadata:
  name: web
spec:
  form: process
  process:
    command: [/bin/sleep, '100']
  resources: {cpu: 500m, memory: 64Mi}
---
# comment-only docs are skipped
---
kind: Node
metadata: {name: edge-1, labels: {tier: near}}
";

    #[test]
    fn parses_multi_document_yaml() {
        let m = parse_manifests(GOOD).expect("valid");
        assert_eq!(m.len(), 2);
        let Manifest::Instance(i) = &m[0] else {
            panic!("instance first")
        };
        assert_eq!(i.spec.resources.cpu.0, 500);
        assert_eq!(i.spec.resources.memory.0, 64 << 20);
    }

    #[test]
    fn bad_quantity_names_field_value_and_fix() {
        let err = parse_manifests(&GOOD.replace("64Mi", "64Q")).expect_err("bad");
        let text = err.to_string();
        assert!(text.contains("spec.resources.memory"), "{text}");
        assert!(text.contains("64Q"), "{text}");
        assert!(text.contains("e.g. 64Mi"), "{text}");
    }

    #[test]
    fn unknown_field_and_kind_are_refused() {
        let err = parse_manifests(&GOOD.replace("resources:", "resurces:")).expect_err("bad");
        assert!(err.to_string().contains("resurces"), "{err}");
        let err = parse_manifests("kind: Pod\nmetadata: {name: x}\n").expect_err("bad");
        assert!(err.to_string().contains("kind: 'Pod'"), "{err}");
    }

    /// Strict at the user's door at every depth, naming the path; the same JSON decodes
    /// leniently as the wire and the store decode it.
    #[test]
    fn unknown_fields_are_refused_at_any_depth_by_name_but_ignored_on_the_wire() {
        let text = GOOD.replace("memory: 64Mi}", "memory: 64Mi, memry: 1Gi}");
        let err = parse_manifests(&text).expect_err("bad");
        assert!(err.to_string().contains("spec.resources.memry"), "{err}");
        let docs = parse_documents(&text).expect("documents");
        let lenient: Result<crate::Instance, _> = serde_json::from_value(docs[0].clone());
        assert!(lenient.is_ok(), "{lenient:?}");
    }

    #[test]
    fn validation_names_the_field() {
        let err = parse_manifests(&GOOD.replace("name: web", "name: Web_1")).expect_err("bad");
        assert!(err.to_string().contains("metadata.name: 'Web_1'"), "{err}");
        let err = parse_manifests("kind: Instance\nmetadata: {name: a}\nspec: {form: process}\n")
            .expect_err("bad");
        assert!(err.to_string().contains("spec.process"), "{err}");
        let err = parse_manifests(&GOOD.replace("tier: near", "tier: far")).expect_err("bad");
        assert!(err.to_string().contains("tier must be one of"), "{err}");
    }

    #[test]
    fn artifact_fields_take_a_registry_reference_a_digest_or_a_node_path() {
        let vm = |disk: &str| {
            format!(
                "kind: Instance\nmetadata: {{name: v}}\nspec:\n  form: vm\n  vm: {{disk: '{disk}'}}\n  resources: {{cpu: '1', memory: 64Mi}}\n"
            )
        };
        let digest = format!("sha256:{}", "ab".repeat(32));
        for good in [
            "/var/lib/verge/disk.img",
            "registry.example:5000/vm/disk:1",
            "busybox@sha256:0123",
            digest.as_str(),
        ] {
            parse_manifests(&vm(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "sha256:abc",
            &format!("sha256:{}", "AB".repeat(32)),
            "../disk.img",
            "disk.img,format=qcow2",
            "two words",
        ] {
            let err = parse_manifests(&vm(bad)).expect_err(bad).to_string();
            assert!(err.contains("spec.vm.disk"), "{err}");
            assert!(err.contains("verge artifact push"), "{err}");
        }
    }

    #[test]
    fn json_arrays_work() {
        let m = parse_manifests(r#"[{"kind":"Node","metadata":{"name":"n1"}}]"#).expect("ok");
        assert_eq!(m[0].name(), "n1");
        assert!(parse_manifests("{not json").is_err());
    }
}
